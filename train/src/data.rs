//! Training-time data: augmentation and conversion to floats. Reading and splitting the
//! dataset is shared with the daemon ([`csg_bundle::dataset`]).

pub use csg_bundle::dataset::*;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Training-time augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Augment {
    /// Random shift by up to this many pixels (zero-padded crop).
    pub crop_padding: usize,
    /// Random horizontal flip with probability ½.
    pub flip: bool,
}

/// Converts bytes to [0,1] floats, applying augmentation when given. Output is [N·H·W] in
/// N,H,W order (channel 1).
pub fn to_floats(
    data: &Dataset,
    indices: &[usize],
    augment: Option<(Augment, &mut ChaCha8Rng)>,
) -> Vec<f32> {
    let (h, w) = (data.rows, data.cols);
    let mut out = vec![0.0f32; indices.len() * h * w];
    match augment {
        None => {
            for (slot, &i) in indices.iter().enumerate() {
                for (dst, &src) in out[slot * h * w..(slot + 1) * h * w]
                    .iter_mut()
                    .zip(data.image(i))
                {
                    *dst = f32::from(src) / 255.0;
                }
            }
        }
        Some((augment, rng)) => {
            let pad = augment.crop_padding as i32;
            for (slot, &i) in indices.iter().enumerate() {
                let (dy, dx) = if pad > 0 {
                    (
                        rng.random_range(-pad..=pad) as isize,
                        rng.random_range(-pad..=pad) as isize,
                    )
                } else {
                    (0, 0)
                };
                let flip = augment.flip && rng.random_bool(0.5);
                let src = data.image(i);
                let dst = &mut out[slot * h * w..(slot + 1) * h * w];
                for y in 0..h {
                    let sy = y as isize + dy;
                    if sy < 0 || sy >= h as isize {
                        continue;
                    }
                    for x in 0..w {
                        let xx = if flip { w - 1 - x } else { x };
                        let sx = xx as isize + dx;
                        if sx < 0 || sx >= w as isize {
                            continue;
                        }
                        dst[y * w + x] = f32::from(src[sy as usize * w + sx as usize]) / 255.0;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn augmentation_shifts_and_flips_within_bounds() {
        let data = Dataset {
            rows: 2,
            cols: 3,
            images: vec![0, 0, 255, 0, 0, 0],
            labels: vec![0],
        };
        let plain = to_floats(&data, &[0], None);
        assert_eq!(plain, vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let flip_only = Augment {
            crop_padding: 0,
            flip: true,
        };
        let mut seen_flip = false;
        for _ in 0..20 {
            let out = to_floats(&data, &[0], Some((flip_only, &mut rng)));
            assert!(out == plain || out == vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
            seen_flip |= out != plain;
        }
        assert!(seen_flip);
    }
}
