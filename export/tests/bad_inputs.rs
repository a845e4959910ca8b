//! Bad checkpoints give errors that say what was expected and what was found, and leave no
//! output file behind.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::ckpt::{self, Rng};
use csg_export::{ExportOptions, Format, export};

/// Exports and returns the error text, asserting nothing was written to the output directory.
fn export_err(ckpt: &Path, format: Format) -> String {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.onnx");
    let options = ExportOptions {
        format,
        ..ExportOptions::default()
    };
    let err = match export(ckpt, &out, &options) {
        Ok(_) => panic!("exporting {} should fail", ckpt.display()),
        Err(e) => e.to_string(),
    };
    assert!(!out.exists(), "output written despite: {err}");
    assert_eq!(
        std::fs::read_dir(out_dir.path()).unwrap().count(),
        0,
        "leftovers after: {err}"
    );
    err
}

fn assert_mentions(err: &str, words: &[&str]) {
    for w in words {
        assert!(err.contains(w), "error lacks {w:?}: {err}");
    }
}

/// Writes a zip holding `archive/data.pkl` = `pickle` (stored, as torch.save does).
fn zip_with_pickle(path: &Path, pickle: &[u8]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

/// Copies a torch.save archive, passing its data.pkl through `edit`.
fn edit_pickle(src: &Path, dst: &Path, edit: impl Fn(&mut Vec<u8>)) {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(src).unwrap()).unwrap();
    let mut out = zip::ZipWriter::new(std::fs::File::create(dst).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().to_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        if name.ends_with("data.pkl") {
            edit(&mut bytes);
        }
        out.start_file(name, opts).unwrap();
        out.write_all(&bytes).unwrap();
    }
    out.finish().unwrap();
}

/// Replaces every occurrence of `from` by `to` (same length, so the pickle stays valid).
fn replace(bytes: &mut [u8], from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let (from, to) = (from.as_bytes(), to.as_bytes());
    let mut hits = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            hits += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(
        hits > 0,
        "{} not in the pickle",
        String::from_utf8_lossy(from)
    );
}

fn fixture(name: &str) -> Option<PathBuf> {
    common::fixtures_dir(name).map(|d| d.join("bottleneck-narrow-csg-official.pt"))
}

#[test]
fn not_a_zip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random.pt");
    let mut rng = Rng::new(11);
    let bytes: Vec<u8> = (0..4096).map(|_| (rng.uniform() * 256.0) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let err = export_err(&path, Format::Pytorch);
    assert_mentions(
        &err,
        &[
            "expected a PyTorch checkpoint",
            "zip",
            "found a file starting with bytes",
        ],
    );
    let err = export_err(&path, Format::Auto);
    assert_mentions(&err, &["expected", "safetensors", "found"]);

    let empty = dir.path().join("empty.pt");
    std::fs::write(&empty, b"").unwrap();
    assert_mentions(&export_err(&empty, Format::Auto), &["found an empty file"]);
}

#[test]
fn pickle_that_is_not_a_state_dict() {
    let dir = tempfile::tempdir().unwrap();
    let int = dir.path().join("int.pt");
    zip_with_pickle(&int, b"\x80\x02K\x05.");
    assert_mentions(
        &export_err(&int, Format::Auto),
        &["expected a state dict", "found the integer 5"],
    );

    let dict = dir.path().join("dict.pt");
    zip_with_pickle(&dict, b"\x80\x02}q\x00X\x05\x00\x00\x00epochK\x07s.");
    assert_mentions(
        &export_err(&dict, Format::Auto),
        &[
            "expected a state dict",
            "found a dict with no tensors (keys: epoch)",
        ],
    );

    let garbage = dir.path().join("garbage.pt");
    zip_with_pickle(&garbage, b"this is not a pickle");
    assert_mentions(
        &export_err(&garbage, Format::Auto),
        &["cannot read the pickle", "data.pkl"],
    );

    let no_pickle = dir.path().join("nopkl.pt");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&no_pickle).unwrap());
    zip.start_file("readme.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    zip.write_all(b"hi").unwrap();
    zip.finish().unwrap();
    assert_mentions(
        &export_err(&no_pickle, Format::Auto),
        &["expected a torch.save archive", "readme.txt"],
    );
}

#[test]
fn truncated_archive() {
    let Some(src) = fixture("truncated_archive") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half.pt");
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(
        &export_err(&path, Format::Auto),
        &["expected a complete zip archive", "truncated"],
    );
}

#[test]
fn missing_misshapen_and_uninferable_official_checkpoints() {
    let Some(src) = fixture("missing_misshapen_and_uninferable_official_checkpoints") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("missing.pt");
    edit_pickle(&src, &missing, |p| {
        replace(
            p,
            "module.layer3.1.bn2.running_var",
            "module.layer3.1.bn2.running_vaX",
        )
    });
    assert_mentions(
        &export_err(&missing, Format::Auto),
        &[
            "missing tensors expected by resnet-bottleneck-2-2-2-2",
            "layer3.1.bn2.running_var",
        ],
    );

    let misshapen = dir.path().join("misshapen.pt");
    edit_pickle(&src, &misshapen, |p| {
        replace(
            p,
            "module.layer2.0.conv1.weight",
            "module.layer2.0.convT.weight",
        );
        replace(
            p,
            "module.layer2.0.conv2.weight",
            "module.layer2.0.conv1.weight",
        );
        replace(
            p,
            "module.layer2.0.convT.weight",
            "module.layer2.0.conv2.weight",
        );
    });
    assert_mentions(
        &export_err(&misshapen, Format::Auto),
        &[
            "layer2.0.conv1.weight is misshapen",
            "expected shape [16, 32, 1, 1]",
            "found [16, 16, 3, 3]",
        ],
    );

    let stemless = dir.path().join("stemless.pt");
    edit_pickle(&src, &stemless, |p| {
        replace(p, "module.conv1.weight", "module.convX.weight")
    });
    assert_mentions(
        &export_err(&stemless, Format::Auto),
        &[
            "cannot infer the architecture",
            "expected torchvision ResNet",
            "found",
            "no conv1.weight",
        ],
    );
}

#[test]
fn csg_train_checkpoint_with_missing_or_misshapen_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let classes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let input = ckpt::input_spec(1, 12);

    let mut net = ckpt::cnn(5, 3, true);
    net.weights.remove("features.1.bn.running_mean");
    let path = dir.path().join("missing.safetensors");
    ckpt::write(&path, &net.arch, &net.weights, &classes, &input);
    assert_mentions(
        &export_err(&path, Format::Auto),
        &[
            "missing tensors expected by cnn-4-6-8",
            "features.1.bn.running_mean",
        ],
    );

    let mut net = ckpt::cnn(5, 3, true);
    if let Some((shape, data)) = net.weights.get_mut("fc.weight") {
        *shape = vec![8, 3];
        let _ = data;
    }
    let path = dir.path().join("misshapen.safetensors");
    ckpt::write(&path, &net.arch, &net.weights, &classes, &input);
    assert_mentions(
        &export_err(&path, Format::Auto),
        &[
            "fc.weight is misshapen",
            "expected shape [3, 8]",
            "found [8, 3]",
        ],
    );

    let not_ours = dir.path().join("plain.safetensors");
    safetensors::serialize_to_file(
        Vec::<(String, safetensors::tensor::TensorView)>::new(),
        None,
        &not_ours,
    )
    .unwrap();
    assert_mentions(
        &export_err(&not_ours, Format::CsgTrain),
        &["expected header metadata csg.arch"],
    );

    let zip_as_ours = dir.path().join("int.pt");
    zip_with_pickle(&zip_as_ours, b"\x80\x02K\x05.");
    assert_mentions(
        &export_err(&zip_as_ours, Format::CsgTrain),
        &["expected a safetensors checkpoint"],
    );
}
