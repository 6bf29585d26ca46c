//! Building a [`ClientConfig`](crate::api::ClientConfig) from Consul's environment variables.
//! (Placeholder: being written.)

/// A configuration value that can't be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Placeholder.
    #[error("{name}: {problem}")]
    Invalid {
        /// The variable or option.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// Validates `host:port`.
pub(crate) fn parse_authority(name: &str, value: &str) -> Result<String, ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::Invalid { name: name.into(), problem: "empty".into() });
    }
    Ok(value.to_owned())
}
