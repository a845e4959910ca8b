//! Where a fixed-rate run's slowest answers sit in time: bunched into a few episodes (a stall
//! and the backlog it leaves behind) or spread evenly over the run.
//!
//! Why: the tiny model's p99 at half load moves between 1.9 and 4× p50 from one 10-second
//! round to the next with nothing changed. The per-request timelines behind that (README,
//! Performance) showed much of a bad round's tail inside one or two episodes of 20–55 ms, so
//! a round's p99 says more about whether such an episode happened than about the daemon's
//! steady state. Each round reports that, so a reader can tell the two cases apart.
//!
//! Plain std and serde, so that `tests/load_episodes.rs` can compile it and test it there:
//! the load benchmark itself has no test harness.

use std::time::Duration;

use serde::Serialize;

/// Tail answers less than this far apart (by scheduled time) belong to one episode.
pub const EPISODE_GAP: Duration = Duration::from_millis(3);

/// How a run's slowest 1 % of answers are spread over time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TailEpisodes {
    /// The slowest 1 % of the answers.
    pub tail: usize,
    /// Runs of tail answers with less than [`EPISODE_GAP`] between neighbours.
    pub episodes: usize,
    /// Share of the tail in the three largest episodes.
    pub top3_share: f64,
    /// From the first to the last tail answer of the largest episode.
    pub largest_span_ms: f64,
    /// When the largest episode started, from the run's first scheduled request.
    pub largest_at_ms: f64,
}

/// Groups the slowest `1 − q` of the answers into episodes. `points` are
/// (scheduled time since the run's start, latency), in any order.
pub fn tail_episodes(points: &[(Duration, Duration)], q: f64) -> Option<TailEpisodes> {
    if points.is_empty() {
        return None;
    }
    let mut by_latency: Vec<&(Duration, Duration)> = points.iter().collect();
    by_latency.sort_unstable_by_key(|p| std::cmp::Reverse(p.1));
    let slowest = (((1.0 - q) * points.len() as f64).round() as usize).max(1);
    let mut tail: Vec<Duration> = by_latency.iter().take(slowest).map(|p| p.0).collect();
    tail.sort_unstable();
    // (start, end, answers) of each episode, in time order.
    let mut episodes: Vec<(Duration, Duration, usize)> = Vec::new();
    for &at in &tail {
        match episodes.last_mut() {
            Some(last) if at.saturating_sub(last.1) < EPISODE_GAP => {
                last.1 = at;
                last.2 += 1;
            }
            _ => episodes.push((at, at, 1)),
        }
    }
    episodes.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    let largest = episodes.first()?;
    let top3: usize = episodes.iter().take(3).map(|e| e.2).sum();
    Some(TailEpisodes {
        tail: tail.len(),
        episodes: episodes.len(),
        top3_share: top3 as f64 / tail.len() as f64,
        largest_span_ms: (largest.1 - largest.0).as_secs_f64() * 1e3,
        largest_at_ms: largest.0.as_secs_f64() * 1e3,
    })
}
