//! What the proxy does with a guarded request once csgd has looked at it: a pure function of
//! the route's policy, its failure policy and the judgement, so every combination is tested
//! without a network.
//!
//! | judgement | block | tag | shadow |
//! |---|---|---|---|
//! | clean | forward, tagged | forward, tagged | forward untouched |
//! | adversarial | 403 from csgd | forward, tagged | forward untouched |
//! | invalid request (no or undecodable image, 4xx) | that 4xx | forward, tagged unchecked | forward untouched |
//! | csgd cannot judge (overload, model error, timeout, not ready, uncalibrated) | fail-open: forward tagged unchecked; fail-closed: 503 | same | forward untouched |
//!
//! (A body over `server.body_limit_bytes` is answered 413 before any of this, whatever the
//! policy: it cannot be judged without being read whole.)

use axum::Json;
use axum::http::header::{HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::config::{FailurePolicy, Policy};
use crate::detect::Verdict;
use crate::http::ApiError;
use crate::http::error::ErrorKind;

/// What csgd found.
#[derive(Debug)]
pub enum Judgement {
    /// Every image of the request was judged (none is `None`).
    Judged {
        model: String,
        verdicts: Vec<Verdict>,
    },
    /// The request is not what the route declares: the client's mistake (a 4xx).
    Invalid(ApiError),
    /// csgd could not judge: overloaded, failed, timed out, not ready or uncalibrated.
    Unchecked(ApiError),
}

impl Judgement {
    /// `clean`, `adversarial` or `unchecked`, for headers and metrics.
    pub fn verdict(&self) -> &'static str {
        match self {
            Judgement::Judged { verdicts, .. } => {
                if verdicts.iter().any(|v| v.is_adversarial == Some(true)) {
                    "adversarial"
                } else {
                    "clean"
                }
            }
            Judgement::Invalid(_) | Judgement::Unchecked(_) => "unchecked",
        }
    }
}

/// The proxy's move.
#[derive(Debug)]
pub enum Decision {
    /// Send the request on with these extra headers (empty for shadow routes).
    Forward(HeaderMap),
    /// Answer the client from csgd; `cause` labels the blocked counter.
    Answer {
        cause: &'static str,
        response: Response,
    },
}

pub fn decide(policy: Policy, on_error: FailurePolicy, judgement: &Judgement) -> Decision {
    if policy == Policy::Shadow {
        return Decision::Forward(HeaderMap::new());
    }
    match judgement {
        Judgement::Judged { model, verdicts } => {
            let adversarial = judgement.verdict() == "adversarial";
            if adversarial && policy == Policy::Block {
                return Decision::Answer {
                    cause: "adversarial",
                    response: blocked(model, verdicts),
                };
            }
            Decision::Forward(tags(judgement.verdict(), Some((model, verdicts)), None))
        }
        Judgement::Invalid(e) => match policy {
            Policy::Block => Decision::Answer {
                cause: "invalid",
                response: e.clone().into_response(),
            },
            _ => Decision::Forward(tags("unchecked", None, Some(e.kind))),
        },
        Judgement::Unchecked(e) => match on_error {
            FailurePolicy::FailOpen => Decision::Forward(tags("unchecked", None, Some(e.kind))),
            FailurePolicy::FailClosed => Decision::Answer {
                cause: "fail_closed",
                response: fail_closed(e),
            },
        },
    }
}

/// The 403 for an adversarial request: the protocol-neutral `{error, kind}` plus the verdicts.
fn blocked(model: &str, verdicts: &[Verdict]) -> Response {
    let flagged = verdicts
        .iter()
        .filter(|v| v.is_adversarial == Some(true))
        .count();
    let body = json!({
        "error": format!(
            "csgd judged {flagged} of {} image(s) adversarial (model {model:?}); the request was not forwarded",
            verdicts.len()
        ),
        "kind": "adversarial",
        "model": model,
        "verdicts": verdicts,
    });
    let mut response = (StatusCode::FORBIDDEN, Json(body)).into_response();
    response.extensions_mut().insert(ErrorKind("adversarial"));
    response
}

/// The 503 of a fail-closed route csgd could not judge.
fn fail_closed(e: &ApiError) -> Response {
    let body = json!({
        "error": format!("csgd could not check the request and this route fails closed: {}", e.message),
        "kind": "unchecked",
        "cause": e.kind,
    });
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response.extensions_mut().insert(ErrorKind("unchecked"));
    response
}

/// The `x-csgd-*` headers. For several images the one reported is the first flagged, else the
/// highest-scoring.
fn tags(verdict: &str, judged: Option<(&str, &[Verdict])>, error: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    put("x-csgd-verdict", verdict.to_owned());
    if let Some(kind) = error {
        put("x-csgd-error", kind.to_owned());
    }
    if let Some((model, verdicts)) = judged {
        put("x-csgd-model", model.to_owned());
        put("x-csgd-images", verdicts.len().to_string());
        let shown = verdicts
            .iter()
            .find(|v| v.is_adversarial == Some(true))
            .or_else(|| verdicts.iter().max_by(|a, b| a.score.total_cmp(&b.score)));
        if let Some(v) = shown {
            put("x-csgd-score", v.score.to_string());
            if let Some(t) = v.threshold {
                put("x-csgd-threshold", t.to_string());
            }
            put("x-csgd-class", v.class_id.to_string());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(adversarial: bool, score: f64) -> Verdict {
        Verdict {
            class_id: 3,
            label: "dress".into(),
            probability: 0.9,
            is_adversarial: Some(adversarial),
            score,
            score_name: "combined",
            threshold: Some(2.0),
            components: vec![],
            top_filters: vec![],
        }
    }

    fn judged(flags: &[bool]) -> Judgement {
        Judgement::Judged {
            model: "m".into(),
            verdicts: flags
                .iter()
                .enumerate()
                .map(|(i, &a)| verdict(a, i as f64))
                .collect(),
        }
    }

    fn forward(d: Decision) -> HeaderMap {
        match d {
            Decision::Forward(h) => h,
            Decision::Answer { cause, .. } => panic!("answered ({cause})"),
        }
    }

    fn answer(d: Decision) -> (&'static str, StatusCode) {
        match d {
            Decision::Answer { cause, response } => (cause, response.status()),
            Decision::Forward(_) => panic!("forwarded"),
        }
    }

    #[test]
    fn block_stops_adversarial_and_tags_clean() {
        use FailurePolicy::*;
        let h = forward(decide(Policy::Block, FailClosed, &judged(&[false, false])));
        assert_eq!(h["x-csgd-verdict"], "clean");
        assert_eq!(h["x-csgd-images"], "2");
        assert_eq!(h["x-csgd-score"], "1", "highest score shown");
        assert_eq!(
            answer(decide(Policy::Block, FailOpen, &judged(&[false, true]))),
            ("adversarial", StatusCode::FORBIDDEN)
        );
        let h = forward(decide(Policy::Tag, FailClosed, &judged(&[false, true])));
        assert_eq!(h["x-csgd-verdict"], "adversarial");
        assert_eq!(h["x-csgd-threshold"], "2");
        assert!(forward(decide(Policy::Shadow, FailClosed, &judged(&[true]))).is_empty());
    }

    #[test]
    fn failures_follow_the_failure_policy_and_shadow_always_forwards() {
        use FailurePolicy::*;
        let overload = || Judgement::Unchecked(ApiError::overloaded("busy"));
        let h = forward(decide(Policy::Block, FailOpen, &overload()));
        assert_eq!(h["x-csgd-verdict"], "unchecked");
        assert_eq!(h["x-csgd-error"], "overloaded");
        assert_eq!(
            answer(decide(Policy::Tag, FailClosed, &overload())),
            ("fail_closed", StatusCode::SERVICE_UNAVAILABLE)
        );
        assert!(forward(decide(Policy::Shadow, FailClosed, &overload())).is_empty());
        let invalid = || Judgement::Invalid(ApiError::malformed("no image"));
        assert_eq!(
            answer(decide(Policy::Block, FailOpen, &invalid())),
            ("invalid", StatusCode::BAD_REQUEST)
        );
        let h = forward(decide(Policy::Tag, FailClosed, &invalid()));
        assert_eq!(h["x-csgd-error"], "malformed");
    }
}
