//! The gate matrix as a heat-map PNG: one row per filter (K up to 2048), one column per class,
//! class names written vertically above their columns, filter indices on the left and a colour
//! bar for [0, 1] on the right. Text uses the public-domain 8×8 bitmap font of `font8x8`, so no
//! system fonts are needed.

use std::path::Path;

use csg_bundle::Gate;
use font8x8::legacy::BASIC_LEGACY;
use image::{ImageFormat, Rgb, RgbImage};

use crate::ExportError;

const GLYPH: u32 = 8;
const MARGIN: u32 = 8;
/// Room for filter indices up to 4 digits and a tick.
const LEFT: u32 = 5 * GLYPH + 6;
const MAX_LABEL: usize = 20;
const BAR: u32 = 12;
const BG: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);

/// Viridis, sampled at five points; good in grey-scale and for colour-blind readers.
const VIRIDIS: [[f32; 3]; 5] = [
    [68.0, 1.0, 84.0],
    [59.0, 82.0, 139.0],
    [33.0, 145.0, 140.0],
    [94.0, 201.0, 98.0],
    [253.0, 231.0, 37.0],
];

fn colour(v: f32) -> Rgb<u8> {
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = v * (VIRIDIS.len() - 1) as f32;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let t = x - i as f32;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    Rgb([0, 1, 2].map(|c| (a[c] + (b[c] - a[c]) * t).round() as u8))
}

fn glyph(ch: char) -> [u8; 8] {
    let code = ch as usize;
    BASIC_LEGACY
        .get(code)
        .copied()
        .unwrap_or(BASIC_LEGACY[b'?' as usize])
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Horizontal text with its top-left corner at (x, y).
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str) {
    for (i, ch) in s.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    put(img, x + (i as i64) * 8 + col, y + row as i64, INK);
                }
            }
        }
    }
}

/// Text rotated 90° anticlockwise (reading upwards), its baseline start at (x, y).
fn text_up(img: &mut RgbImage, x: i64, y: i64, s: &str) {
    for (i, ch) in s.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    put(img, x + row as i64, y - (i as i64) * 8 - col, INK);
                }
            }
        }
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_LABEL {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(MAX_LABEL - 1).collect();
        t.push('~');
        t
    }
}

/// Renders the gate to an image.
pub fn gate_image(gate: &Gate, classes: &[String]) -> RgbImage {
    let k = gate.filters.max(1) as u32;
    let c = gate.classes.max(1) as u32;
    let row_h = (1024 / k).clamp(1, 8);
    let col_w = if c <= 64 { 16 } else { (1024 / c).max(2) };
    let label_len = classes
        .iter()
        .map(|s| truncate(s).chars().count())
        .max()
        .unwrap_or(0) as u32;
    let top = MARGIN + GLYPH + MARGIN + label_len * GLYPH + 4;
    let (map_w, map_h) = (c * col_w, k * row_h);
    let title = format!(
        "gate {}x{}  density {:.3}",
        gate.filters,
        gate.classes,
        gate.density()
    );
    let width = (LEFT + map_w + MARGIN + BAR + 4 + 2 * GLYPH + MARGIN)
        .max(2 * MARGIN + GLYPH * title.len() as u32);
    let height = top + map_h + MARGIN;
    let mut img = RgbImage::from_pixel(width, height.max(top + 2 * GLYPH), BG);
    text(&mut img, MARGIN as i64, MARGIN as i64, &title);
    for f in 0..gate.filters {
        for cl in 0..gate.classes {
            let v = gate
                .values
                .get(f * gate.classes + cl)
                .copied()
                .unwrap_or(0.0);
            let rgb = colour(v);
            for dy in 0..row_h {
                for dx in 0..col_w {
                    let x = LEFT + cl as u32 * col_w + dx;
                    img.put_pixel(x, top + f as u32 * row_h + dy, rgb);
                }
            }
        }
    }
    // Class labels, skipping some when columns are narrower than a glyph.
    let every = GLYPH.div_ceil(col_w).max(1) as usize;
    for (i, name) in classes.iter().enumerate().step_by(every) {
        let x = (LEFT + i as u32 * col_w + col_w.saturating_sub(GLYPH) / 2) as i64;
        text_up(&mut img, x, top as i64 - 4, &truncate(name));
    }
    // Filter index ticks about every 64 pixels, at round numbers.
    let step = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
        .into_iter()
        .find(|s| s * row_h >= 48)
        .unwrap_or(1024) as usize;
    for f in (0..gate.filters).step_by(step) {
        let y = (top + f as u32 * row_h) as i64;
        for dx in 0..4 {
            put(&mut img, (LEFT - 5 + dx) as i64, y, INK);
        }
        let label = f.to_string();
        let x = LEFT as i64 - 6 - 8 * label.len() as i64;
        text(&mut img, x, y, &label);
    }
    // Colour bar: 1 at the top, 0 at the bottom.
    let bar_x = LEFT + map_w + MARGIN;
    let bar_h = map_h.max(2 * GLYPH);
    for dy in 0..bar_h {
        let v = 1.0 - dy as f32 / (bar_h - 1).max(1) as f32;
        for dx in 0..BAR {
            put(&mut img, (bar_x + dx) as i64, (top + dy) as i64, colour(v));
        }
    }
    let label_x = (bar_x + BAR + 4) as i64;
    text(&mut img, label_x, top as i64, "1");
    text(&mut img, label_x, (top + bar_h - GLYPH) as i64, "0");
    img
}

/// Writes the gate heat-map PNG to `path`; returns its width and height.
pub fn render_gate(
    gate: &Gate,
    classes: &[String],
    path: &Path,
) -> Result<(u32, u32), ExportError> {
    let img = gate_image(gate, classes);
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, ImageFormat::Png)
        .map_err(|e| ExportError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
    std::fs::write(path, png.into_inner()).map_err(ExportError::io(path))?;
    Ok(img.dimensions())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_large_gates_and_colours_the_ends() {
        let gate = Gate {
            filters: 2048,
            classes: 6,
            values: (0..2048 * 6).map(|i| (i % 7) as f32 / 6.0).collect(),
        };
        let classes: Vec<String> = (0..6)
            .map(|i| format!("class-with-a-long-name-{i}"))
            .collect();
        let img = gate_image(&gate, &classes);
        assert!(img.height() > 2048 && img.width() > 6 * 16);
        assert_eq!(colour(0.0), Rgb([68, 1, 84]));
        assert_eq!(colour(1.0), Rgb([253, 231, 37]));
        assert_eq!(colour(f32::NAN), colour(0.0));
    }
}
