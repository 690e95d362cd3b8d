use std::collections::HashMap;
use std::path::Path;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

/// Loads a configuration in layers: `T::default()`, then the TOML file when
/// given, then environment variables `<PREFIX><FIELD>` with `__` separating
/// nested fields (`K8SHELL_PROVISIONER_GRPC__ADDR`).
///
/// The environment is a parameter, not read here, so tests stay hermetic.
pub fn load_config<T>(
    prefix: &str,
    file: Option<&Path>,
    env: &HashMap<String, String>,
) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = file {
        figment = figment.merge(Toml::file_exact(file));
    }
    let prefix_upper = prefix.to_ascii_uppercase();
    let mut overrides = serde_json::Map::new();
    for (key, value) in env {
        let Some(rest) = key.strip_prefix(&prefix_upper) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        insert_path(&mut overrides, &path, parse_env_value(value));
    }
    figment = figment.merge(Serialized::defaults(serde_json::Value::Object(overrides)));
    figment.extract().map_err(|e| ConfigError(Box::new(e)))
}

fn parse_env_value(value: &str) -> serde_json::Value {
    // Numbers and booleans come through as such; everything else stays a
    // string (figment converts strings to the target type where it can).
    serde_json::from_str::<serde_json::Value>(value)
        .ok()
        .filter(|v| v.is_number() || v.is_boolean())
        .unwrap_or_else(|| serde_json::Value::String(value.to_owned()))
}

fn insert_path(
    map: &mut serde_json::Map<String, serde_json::Value>,
    path: &[String],
    value: serde_json::Value,
) {
    match path {
        [] => {}
        [last] => {
            map.insert(last.clone(), value);
        }
        [head, rest @ ..] => {
            let entry = map
                .entry(head.clone())
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            if !entry.is_object() {
                *entry = serde_json::Value::Object(Default::default());
            }
            if let serde_json::Value::Object(inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    struct Inner {
        port: u16,
        host: String,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: String,
        inner: Inner,
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("k8shell-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "name = \"file\"\n[inner]\nhost = \"h\"\nport = 1\n").unwrap();
        let env = HashMap::from([("K8SHELL_X_INNER__PORT".to_owned(), "7".to_owned())]);
        let cfg: Sample = load_config("K8SHELL_X_", Some(&file), &env).unwrap();
        assert_eq!(
            cfg,
            Sample {
                name: "file".into(),
                inner: Inner {
                    port: 7,
                    host: "h".into()
                }
            }
        );
    }

    #[test]
    fn unknown_fields_and_bad_types_are_errors() {
        let env = HashMap::from([("K8SHELL_X_NAMEE".to_owned(), "x".to_owned())]);
        assert!(load_config::<Sample>("K8SHELL_X_", None, &env).is_err());
        let env = HashMap::from([("K8SHELL_X_INNER__PORT".to_owned(), "many".to_owned())]);
        let err = load_config::<Sample>("K8SHELL_X_", None, &env).unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
    }
}
