//! ROC curves as PNG with `plotters`, one curve per attack for the default (combined) score.

use std::path::Path;

use plotters::prelude::*;

use super::roc;

/// Score lists of one model: clean test images and each attack's adversarial images.
#[derive(Debug, Clone, Default)]
pub struct Curves {
    pub clean: Vec<f64>,
    pub attacks: Vec<(String, Vec<f64>)>,
}

/// Where plotters' text renderer finds a font (Debian's `fonts-dejavu-core`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{FONT}: {0}; install the Debian package fonts-dejavu-core")]
    Font(std::io::Error),
    #[error("drawing {path}: {message}")]
    Draw { path: String, message: String },
}

fn register_font() -> Result<(), PlotError> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = ONCE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| e.to_string())?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "not a usable TrueType font".to_string())
    });
    result
        .clone()
        .map_err(|e| PlotError::Font(std::io::Error::other(e)))
}

/// Draws the ROC curves of `curves` to `path` (800×600 PNG).
pub fn roc_png(path: &Path, title: &str, curves: &Curves) -> Result<(), PlotError> {
    register_font()?;
    let draw_err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let root = BitMapBackend::new(path, (800, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0f64..1.0, 0.0f64..1.0)
        .map_err(|e| draw_err(&e))?;
    chart
        .configure_mesh()
        .x_desc("false-positive rate (clean test images)")
        .y_desc("true-positive rate (successful adversarial images)")
        .draw()
        .map_err(|e| draw_err(&e))?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))
        .map_err(|e| draw_err(&e))?;
    for (i, (attack, scores)) in curves.attacks.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let auc = roc::auroc(&curves.clean, scores);
        chart
            .draw_series(LineSeries::new(
                roc::roc_curve(&curves.clean, scores),
                colour.stroke_width(2),
            ))
            .map_err(|e| draw_err(&e))?
            .label(format!("{attack} (AUROC {auc:.3})"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}
