//! Layered configuration shared by both binaries: built-in defaults, then the TOML file named by
//! `--config`, then `WARREN_` environment variables (`__` separates nesting levels, so
//! `WARREN_AMQP__URI` sets `amqp.uri`), then command-line flags. Every error names the key it is
//! about. Each binary owns its settings struct; this module only layers and validates.

#[cfg(feature = "cli")]
pub mod cli;

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Prefix of every environment variable that sets a configuration key.
pub const ENV_PREFIX: &str = "WARREN_";

/// `WARREN_` variables that are not settings: `WARREN_CONFIG` names the file (`--config`'s twin).
const NOT_SETTINGS: &[&str] = &["config"];

fn is_one_of(section: &str, sections: &[&str]) -> bool {
    sections.iter().any(|s| s.eq_ignore_ascii_case(section))
}

/// Whether the environment key `key` (dotted, prefix stripped) is not this binary's to read: it
/// is not a setting, or it sets one of `other_sections`. One shell (or one Kubernetes
/// ConfigMap) commonly serves both binaries, so each skips the other's sections; a misspelt
/// section or key of its own is still refused.
fn skipped(key: &str, other_sections: &[&str]) -> bool {
    let section = key.split('.').next().unwrap_or(key);
    is_one_of(section, NOT_SETTINGS) || is_one_of(section, other_sections)
}

/// The `WARREN_` environment variables that set `other_sections`, which the loader skips; for
/// the binary to log once its logging is up.
pub fn skipped_env_vars(other_sections: &[&str]) -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| {
            name.strip_prefix(ENV_PREFIX).is_some_and(|rest| {
                is_one_of(rest.split("__").next().unwrap_or(rest), other_sections)
            })
        })
        .collect()
}

/// Why a configuration could not be loaded. Nothing starts when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` does not exist or is not a file.
    #[error("config file `{0}` does not exist")]
    MissingFile(String),
    /// A layer could not be parsed or a value has the wrong type; figment's text names the key
    /// and the layer (file or environment variable) it came from.
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    /// A value parsed but is outside what Warren can run with.
    #[error("invalid value for `{key}`: {reason}")]
    OutOfRange {
        /// Full dotted key, e.g. `amqp.prefetch`.
        key: String,
        /// What the value must be.
        reason: String,
    },
}

/// Returns `OutOfRange` for `prefix.key` unless `ok`; the building block of every `validate`.
pub fn check(ok: bool, prefix: &str, key: &str, reason: &str) -> Result<(), ConfigError> {
    if ok {
        return Ok(());
    }
    let key = if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    };
    Err(ConfigError::OutOfRange {
        key,
        reason: reason.to_owned(),
    })
}

/// Builds one settings value from all layers; command-line values are added with [`Self::flag`].
pub struct ConfigLoader {
    figment: Figment,
}

impl ConfigLoader {
    /// Defaults from `T::default()`, then the optional TOML file, then the environment, without
    /// the variables of `other_sections` (the other binary's; see [`skipped_env_vars`]).
    pub fn new<T: Serialize + Default>(
        file: Option<&Path>,
        other_sections: &'static [&'static str],
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(T::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::MissingFile(path.display().to_string()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let env = Env::prefixed(ENV_PREFIX)
            .split("__")
            .filter(move |key| !skipped(key.as_str(), other_sections));
        figment = figment.merge(env);
        Ok(ConfigLoader { figment })
    }

    /// Overrides `key` (dotted path) with a command-line value when the flag was given.
    pub fn flag<V: Serialize>(mut self, key: &str, value: Option<V>) -> Self {
        if let Some(value) = value {
            self.figment = self.figment.merge((key, value));
        }
        self
    }

    /// Extracts the final settings value.
    pub fn extract<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        self.figment
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        outer: Inner,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        count: u16,
        name: String,
    }

    impl Default for Inner {
        fn default() -> Self {
            Inner {
                count: 7,
                name: "default".into(),
            }
        }
    }

    #[test]
    fn flags_override_defaults_and_missing_flags_keep_them() {
        let loaded: Sample = ConfigLoader::new::<Sample>(None, &[])
            .unwrap()
            .flag("outer.count", Some(9u16))
            .flag::<String>("outer.name", None)
            .extract()
            .unwrap();
        assert_eq!(loaded.outer.count, 9);
        assert_eq!(loaded.outer.name, "default");
    }

    #[test]
    fn a_missing_config_file_is_an_error_naming_the_file() {
        let err = ConfigLoader::new::<Sample>(Some(Path::new("/nonexistent/warren.toml")), &[])
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("/nonexistent/warren.toml"),
            "{err}"
        );
    }

    #[test]
    fn a_wrongly_typed_value_names_its_key() {
        let err = ConfigLoader::new::<Sample>(None, &[])
            .unwrap()
            .flag("outer.count", Some("many"))
            .extract::<Sample>()
            .unwrap_err();
        assert!(err.to_string().contains("outer.count"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_full_key() {
        let err = check(false, "amqp", "prefetch", "must be at least 1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for `amqp.prefetch`: must be at least 1"
        );
    }
}
