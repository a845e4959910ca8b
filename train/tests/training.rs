//! Trains briefly on real Fashion-MNIST and checks what training must guarantee: the loss
//! falls, the gate keeps its constraints, and a checkpoint reloads to the same network.

mod common;

use burn::module::Module;
use common::{tiny_config, train_images};
use csg_train::{checkpoint, device, fashion_input};
use csg_train::{data, trainer};

#[test]
fn csg_training_lowers_the_loss_and_keeps_the_gate_projected() {
    let train = train_images(1500);
    let config = tiny_config(true, 8, 3);
    let trained = trainer::train(&config, &train, &device(), false).unwrap();
    assert_eq!(trained.steps, 8 * 30);
    let first = &trained.history[0];
    let last = trained.history.last().unwrap();
    assert!(
        last.standard_loss < 0.7 * first.standard_loss,
        "standard loss {} -> {}",
        first.standard_loss,
        last.standard_loss
    );
    let (g0, g1) = (first.gated_loss.unwrap(), last.gated_loss.unwrap());
    assert!(g1 < g0, "gated loss {g0} -> {g1}");

    let gate = trainer::gate_of(&trained.model).expect("a CSG model has a gate");
    assert_eq!((gate.filters, gate.classes), (32, 10));
    for row in gate.values.chunks(gate.classes) {
        let max = row.iter().copied().fold(f32::MIN, f32::max);
        assert_eq!(
            max, 1.0,
            "every filter belongs fully to some class: {row:?}"
        );
        assert!(row.iter().all(|v| (0.0..=1.0).contains(v)), "{row:?}");
    }
    // The hinge pulls the gate below its all-ones start.
    assert!(gate.density() < 0.95, "density {}", gate.density());
}

#[test]
fn checkpoints_reload_to_the_same_outputs() {
    let train = train_images(400);
    let config = tiny_config(true, 1, 3);
    let trained = trainer::train(&config, &train, &device(), false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let classes: Vec<String> = data::FASHION_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let input = fashion_input(config.mean, config.std);
    checkpoint::save(&trained.model, &classes, &input, &path).unwrap();

    let inner = device().inner();
    let (loaded, info) = checkpoint::load(&path, &inner).unwrap();
    assert_eq!(info.architecture, config.architecture);
    assert_eq!(info.classes, classes);
    assert_eq!(info.input, input);
    assert!(info.gated);
    let before = trainer::evaluate(&trained.model.valid(), &train, 0.286, 0.353, 100, &inner);
    let after = trainer::evaluate(&loaded.valid(), &train, 0.286, 0.353, 100, &inner);
    assert_eq!(before.predictions, after.predictions);
    let worst = before
        .logits
        .iter()
        .zip(&after.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "logits differ by {worst}");
    assert_eq!(trainer::gate_of(&loaded), trainer::gate_of(&trained.model));
}

#[test]
fn standard_training_has_no_gate() {
    let train = train_images(200);
    let config = tiny_config(false, 1, 3);
    let trained = trainer::train(&config, &train, &device(), false).unwrap();
    assert!(trainer::gate_of(&trained.model).is_none());
    assert!(trained.history[0].gated_loss.is_none());
}

/// Label smoothing is the standard path's alone: from the same weights on the same first batch,
/// the gated loss is unchanged by it (the published hard-label CSG loss) while the standard
/// loss is not.
#[test]
fn label_smoothing_leaves_the_gated_loss_hard() {
    let train = train_images(100);
    let first_step = |smoothing: Option<f32>| {
        let mut config = tiny_config(true, 1, 11);
        config.schedule = csg_train::csg::Schedule::Joint { weight: 1.0 };
        config.max_steps = Some(1);
        config.label_smoothing = smoothing;
        let trained = trainer::train(&config, &train, &device(), false).unwrap();
        trained.history[0].clone()
    };
    let (hard, smoothed) = (first_step(None), first_step(Some(0.1)));
    let (g_hard, g_smoothed) = (hard.gated_loss.unwrap(), smoothed.gated_loss.unwrap());
    assert!(
        (g_hard - g_smoothed).abs() < 1e-6,
        "gated {g_hard} vs {g_smoothed}"
    );
    assert!(
        (hard.standard_loss - smoothed.standard_loss).abs() > 1e-4,
        "standard {} vs {}",
        hard.standard_loss,
        smoothed.standard_loss
    );
}
