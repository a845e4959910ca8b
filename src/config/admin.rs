//! `[admin]`: the operator's routes (hot reload of the model bundles). Off by default; when
//! on, every call must carry `Authorization: Bearer <admin.token>`.

use serde::{Deserialize, Serialize, Serializer};

use super::{ConfigError, invalid};

/// Shortest token accepted: a guessable token would turn the route into a remote button
/// anyone on the network can press.
pub const MIN_TOKEN_CHARS: usize = 16;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub enabled: bool,
    pub token: Secret,
}

impl AdminConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled && self.token.expose().trim().chars().count() < MIN_TOKEN_CHARS {
            return Err(invalid(
                "admin.token",
                format!(
                    "must be at least {MIN_TOKEN_CHARS} characters when admin.enabled is true \
                     (set it with CSGD_ADMIN__TOKEN rather than in a file others can read)"
                ),
            ));
        }
        Ok(())
    }
}

/// A value that must not reach logs or `--print-config`: Debug and Serialize show only
/// whether it is set.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    fn shown(&self) -> &'static str {
        if self.0.is_empty() { "" } else { "<redacted>" }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.shown())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.shown())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_only_when_enabled_and_never_shown() {
        let off = AdminConfig {
            enabled: false,
            token: Secret::default(),
        };
        assert!(off.validate().is_ok());
        let short = AdminConfig {
            enabled: true,
            token: Secret::new("hunter2"),
        };
        assert!(
            short
                .validate()
                .unwrap_err()
                .to_string()
                .contains("admin.token")
        );
        let good = AdminConfig {
            enabled: true,
            token: Secret::new("a-long-enough-secret-token"),
        };
        assert!(good.validate().is_ok());
        let printed = serde_json::to_string(&good).unwrap();
        assert!(!printed.contains("secret-token"), "{printed}");
        assert!(!format!("{good:?}").contains("secret-token"));
    }
}
