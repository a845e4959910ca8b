//! csgd: an inference daemon that flags adversarial inputs to class-specific-gate CNNs.
//!
//! Data flows one way: HTTP request ([`http`]) → decoding and preprocessing ([`preprocess`])
//! → the model's batching queue ([`batch`]) → ONNX Runtime ([`runtime`]) → the detector's
//! verdict ([`detect`]) → JSON answer. [`explain`] answers, on request, which class-specific
//! filters fired and where. [`oip`] is the Open Inference Protocol's wire format, [`proxy`]
//! the sidecar mode that judges requests on their way to another classifier. [`config`] holds
//! the settings, [`registry`] the served models, [`metrics`] the Prometheus metrics, [`server`]
//! and [`shutdown`] the process life cycle.

pub mod batch;
pub mod calibrate;
pub mod config;
pub mod detect;
pub mod eval;
pub mod explain;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod oip;
pub mod preprocess;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod shutdown;
