//! Prometheus metrics, served on `/metrics` in the text exposition format.
//!
//! Every duration and size is a histogram (aggregatable across replicas, unlike summaries).
//! Each [`Metrics`] owns its registry rather than using the process-global one, so tests can
//! build as many as they like. Label values are bounded: model labels only ever hold configured
//! model names (a request for an unknown model is counted under `model=""`), routes are route
//! templates, classes come from the bundle.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Latency buckets from 25 µs to ~27 s (×2 steps): inference of a small CNN takes well under a
/// millisecond, a queue under load or a big image can take seconds.
fn duration_buckets() -> Vec<f64> {
    (0..21).map(|i| 25e-6 * 2f64.powi(i)).collect()
}

/// Verdict scores: the combined score is −ln of a combined p-value (0 … ~10), the margin score is
/// −ln(logit margin) (≈ −5 … 10), the others lie in [0, 1] or are log distances.
fn score_buckets() -> Vec<f64> {
    vec![
        -4.0, -2.0, -1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0,
        15.0,
    ]
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub failures: IntCounterVec,
    pub verdicts: IntCounterVec,
    pub scores: HistogramVec,
    pub request_duration: HistogramVec,
    pub queue_duration: HistogramVec,
    pub preprocess_duration: HistogramVec,
    pub inference_duration: HistogramVec,
    pub batch_size: HistogramVec,
    pub images: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub in_flight: IntGauge,
    pub connections: IntGaugeVec,
    pub model_info: GaugeVec,
    pub ready: IntGauge,
    pub reloads: IntCounterVec,
    pub proxy: ProxyMetrics,
}

/// One model's verdict counters and score histogram, taken out of their families once when
/// the model is loaded: a verdict then counts itself without hashing label values and
/// locking the family (as `with_label_values` does). Every class's series exist from the
/// start, at zero.
#[derive(Debug)]
pub struct VerdictMetrics {
    model: String,
    /// Per class: adversarial, clean, unjudged.
    by_class: Vec<[IntCounter; 3]>,
    score: Histogram,
}

impl VerdictMetrics {
    /// The series of `model`, whose classes are `classes` and whose verdict score is `score`.
    pub fn new(metrics: &Metrics, model: &str, classes: &[String], score: &str) -> Self {
        let by_class = classes
            .iter()
            .map(|class| {
                VERDICTS.map(|verdict| metrics.verdicts.with_label_values(&[model, class, verdict]))
            })
            .collect();
        Self {
            model: model.to_owned(),
            by_class,
            score: metrics.scores.with_label_values(&[model, score]),
        }
    }

    /// Counts one verdict on class `class` (`None` adversarial: unjudged) and observes its
    /// score when finite. A class beyond the bundle's list is counted under the class "".
    pub fn record(
        &self,
        metrics: &Metrics,
        class: usize,
        is_adversarial: Option<bool>,
        score: f64,
    ) {
        let verdict = match is_adversarial {
            Some(true) => 0,
            Some(false) => 1,
            None => 2,
        };
        match self.by_class.get(class) {
            Some(counters) => counters[verdict].inc(),
            None => metrics
                .verdicts
                .with_label_values(&[self.model.as_str(), "", VERDICTS[verdict]])
                .inc(),
        }
        if score.is_finite() {
            self.score.observe(score);
        }
    }
}

/// The `verdict` label's values, in [`VerdictMetrics::by_class`] order.
const VERDICTS: [&str; 3] = ["adversarial", "clean", "unjudged"];

/// The sidecar proxy's metrics. `route` is a configured route pattern, or "" for requests
/// that matched none (passed through unchecked by design).
pub struct ProxyMetrics {
    /// Requests sent on to the upstream (whether or not it answered).
    pub forwarded: IntCounterVec,
    /// Requests answered by csgd instead: cause adversarial, fail_closed or invalid.
    pub blocked: IntCounterVec,
    /// Requests forwarded with `x-csgd-*` verdict headers, by verdict.
    pub tagged: IntCounterVec,
    /// Guarded requests csgd could not judge, by cause (the error kind).
    pub unchecked: IntCounterVec,
    /// Verdicts on guarded routes, by policy (shadow routes are only recorded here).
    pub verdicts: IntCounterVec,
    /// Upstream failures by kind: connect, timeout, reset, other.
    pub upstream_errors: IntCounterVec,
    /// Time from forwarding to the upstream's response headers.
    pub upstream_duration: HistogramVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new_custom(Some("csgd".into()), None)?;
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<_, MetricsError> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram = |name: &str,
                         help: &str,
                         labels: &[&str],
                         buckets: Vec<f64>|
         -> Result<_, MetricsError> {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let sizes = vec![
            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
        ];
        let metrics = Metrics {
            requests: counter(
                "http_requests_total",
                "HTTP requests answered, by model, route template and status code.",
                &["model", "route", "status"],
            )?,
            failures: counter(
                "request_failures_total",
                "Requests that failed, by model and cause (the error kind of the answer).",
                &["model", "cause"],
            )?,
            verdicts: counter(
                "verdicts_total",
                "Images judged, by model, predicted class and verdict (adversarial, clean, or unjudged when the model is uncalibrated).",
                &["model", "class", "verdict"],
            )?,
            scores: histogram(
                "detection_score",
                "Verdict scores of judged images, by model and score name.",
                &["model", "score"],
                score_buckets(),
            )?,
            request_duration: histogram(
                "request_duration_seconds",
                "Time from request to answer, by model and route template.",
                &["model", "route"],
                duration_buckets(),
            )?,
            queue_duration: histogram(
                "queue_duration_seconds",
                "Time an image waited in its model's batching queue.",
                &["model"],
                duration_buckets(),
            )?,
            preprocess_duration: histogram(
                "preprocess_duration_seconds",
                "Time to decode and preprocess the images of one request.",
                &["model"],
                duration_buckets(),
            )?,
            inference_duration: histogram(
                "inference_duration_seconds",
                "Time of one ONNX Runtime call (one batch).",
                &["model"],
                duration_buckets(),
            )?,
            batch_size: histogram(
                "batch_size",
                "Images per ONNX Runtime call.",
                &["model"],
                sizes.clone(),
            )?,
            images: histogram(
                "request_images",
                "Images per detection request.",
                &["model"],
                sizes,
            )?,
            queue_depth: {
                let g = IntGaugeVec::new(
                    Opts::new("queue_depth", "Images waiting in the batching queue."),
                    &["model"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            in_flight: {
                let g = IntGauge::new("requests_in_flight", "Detection requests being processed.")?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            connections: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "open_connections",
                        "Open client connections, by listener (api, metrics, proxy).",
                    ),
                    &["listener"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            model_info: {
                let g = GaugeVec::new(
                    Opts::new(
                        "model_info",
                        "Served models (value 1): version, execution provider, verdict score, calibration state.",
                    ),
                    &["model", "version", "provider", "score", "calibrated"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            ready: {
                let g = IntGauge::new("ready", "1 when every model is loaded and warmed up.")?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            reloads: counter(
                "reloads_total",
                "Hot reloads of the model bundles, by trigger (sighup, admin) and result (ok, failed, in_progress, not_serving).",
                &["trigger", "result"],
            )?,
            proxy: ProxyMetrics {
                forwarded: counter(
                    "proxy_forwarded_total",
                    "Requests the sidecar proxy sent on to the upstream, by route pattern (\"\": unguarded).",
                    &["route"],
                )?,
                blocked: counter(
                    "proxy_blocked_total",
                    "Requests the proxy answered itself instead of forwarding, by route and cause (adversarial, fail_closed, invalid).",
                    &["route", "cause"],
                )?,
                tagged: counter(
                    "proxy_tagged_total",
                    "Requests forwarded with x-csgd-* verdict headers, by route and verdict (clean, adversarial, unchecked).",
                    &["route", "verdict"],
                )?,
                unchecked: counter(
                    "proxy_unchecked_total",
                    "Guarded requests csgd could not judge, by route and cause (error kind).",
                    &["route", "cause"],
                )?,
                verdicts: counter(
                    "proxy_verdicts_total",
                    "Verdicts on guarded requests, by route, policy and verdict (clean, adversarial, unchecked).",
                    &["route", "policy", "verdict"],
                )?,
                upstream_errors: counter(
                    "proxy_upstream_errors_total",
                    "Forwarded requests the upstream did not answer, by route and kind (connect, timeout, reset, other).",
                    &["route", "kind"],
                )?,
                upstream_duration: histogram(
                    "proxy_upstream_duration_seconds",
                    "Time from forwarding a request to the upstream's response headers, by route.",
                    &["route"],
                    duration_buckets(),
                )?,
            },
            registry,
        };
        Ok(metrics)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_prefix_and_histograms() {
        let m = Metrics::new().unwrap();
        m.requests
            .with_label_values(&["m", "/v1/detect", "200"])
            .inc();
        m.batch_size.with_label_values(&["m"]).observe(3.0);
        m.scores.with_label_values(&["m", "combined"]).observe(1.2);
        let text = m.render().unwrap();
        assert!(text.contains(
            "csgd_http_requests_total{model=\"m\",route=\"/v1/detect\",status=\"200\"} 1"
        ));
        assert!(text.contains("# TYPE csgd_batch_size histogram"));
        assert!(text.contains("csgd_batch_size_bucket{model=\"m\",le=\"4\"} 1"));
        assert!(!text.contains("summary"));
    }

    #[test]
    fn verdict_series_exist_from_the_start_and_count_by_class() {
        let m = Metrics::new().unwrap();
        let classes = ["shirt".to_string(), "bag".to_string()];
        let v = VerdictMetrics::new(&m, "m", &classes, "combined");
        let line = |class: &str, verdict: &str| {
            format!("csgd_verdicts_total{{class=\"{class}\",model=\"m\",verdict=\"{verdict}\"}}")
        };
        let text = m.render().unwrap();
        assert!(
            text.contains(&format!("{} 0", line("bag", "unjudged"))),
            "{text}"
        );
        v.record(&m, 1, Some(true), 4.5);
        v.record(&m, 1, Some(true), f64::NAN);
        v.record(&m, 0, Some(false), 0.3);
        v.record(&m, 7, None, 1.0);
        let text = m.render().unwrap();
        assert!(
            text.contains(&format!("{} 2", line("bag", "adversarial"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 1", line("shirt", "clean"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 1", line("", "unjudged"))),
            "{text}"
        );
        // Only finite scores are observed.
        assert!(text.contains("csgd_detection_score_count{model=\"m\",score=\"combined\"} 3"));
    }

    #[test]
    fn buckets_are_increasing() {
        for b in [duration_buckets(), score_buckets()] {
            assert!(b.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
