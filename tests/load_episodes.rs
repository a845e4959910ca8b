//! Tests of the load benchmark's tail-episode grouping (`benches/load/episodes.rs`). They
//! live here because the benchmark has no test harness to run them in.

use std::time::Duration;

#[path = "../benches/load/episodes.rs"]
mod episodes;

use episodes::tail_episodes;

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v / 1e3)
}

/// 1,000 answers 0.25 ms apart at 1 ms, with the given (time, latency) ones slower.
fn run_with(slow: &[(f64, f64)]) -> Vec<(Duration, Duration)> {
    let mut points: Vec<(Duration, Duration)> =
        (0..1000).map(|i| (ms(i as f64 * 0.25), ms(1.0))).collect();
    for &(at, lat) in slow {
        let i = (at / 0.25) as usize;
        points[i].1 = ms(lat);
    }
    points
}

#[test]
fn a_stall_is_one_episode() {
    // Ten slow answers within 2.5 ms: the whole tail (the slowest 1 % of 1,000) is one
    // episode, starting at 100 ms.
    let slow: Vec<(f64, f64)> = (0..10).map(|i| (100.0 + i as f64 * 0.25, 9.0)).collect();
    let e = tail_episodes(&run_with(&slow), 0.99).unwrap();
    assert_eq!(e.tail, 10);
    assert_eq!(e.episodes, 1);
    assert_eq!(e.top3_share, 1.0);
    assert!((e.largest_span_ms - 2.25).abs() < 1e-9, "{e:?}");
    assert!((e.largest_at_ms - 100.0).abs() < 1e-9, "{e:?}");
}

#[test]
fn a_spread_tail_is_many_episodes() {
    let slow: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 * 20.0, 3.0)).collect();
    let e = tail_episodes(&run_with(&slow), 0.99).unwrap();
    assert_eq!((e.tail, e.episodes), (10, 10));
    assert!((e.top3_share - 0.3).abs() < 1e-9, "{e:?}");
    assert_eq!(e.largest_span_ms, 0.0);
}

#[test]
fn order_of_the_points_does_not_matter() {
    let slow: Vec<(f64, f64)> = (0..10)
        .map(|i| (50.0 + (i % 5) as f64 * 0.5 + (i / 5) as f64 * 100.0, 5.0))
        .collect();
    let mut points = run_with(&slow);
    let forward = tail_episodes(&points, 0.99);
    points.reverse();
    assert_eq!(forward, tail_episodes(&points, 0.99));
    assert_eq!(forward.map(|e| e.episodes), Some(2));
}

#[test]
fn no_answers_no_episodes() {
    assert_eq!(tail_episodes(&[], 0.99), None);
}
