//! Loading TOML config files: the one loader both daemons use, whose errors
//! name the file and (from serde or the caller's check) the field.

use std::path::{Path, PathBuf};

/// A config file that cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Reads a TOML file into `T` and runs `check` on it. Errors name the file,
/// and (from serde or `check`) the field. Shared by both daemons.
pub fn load_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    check: impl FnOnce(&T) -> Result<(), String>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, check).map_err(|message| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    })
}

/// Parses TOML text into `T` and runs `check` on it.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    check: impl FnOnce(&T) -> Result<(), String>,
) -> Result<T, String> {
    let value: T = toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
    check(&value)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Example {
        port: u16,
    }

    fn port_not_zero(e: &Example) -> Result<(), String> {
        (e.port != 0)
            .then_some(())
            .ok_or_else(|| "field `port` must not be 0".to_string())
    }

    #[test]
    fn errors_name_the_field_and_the_check() {
        assert_eq!(parse_toml("port = 7", port_not_zero).unwrap().port, 7);
        let err = parse_toml::<Example>("port = 7\nbogus = 1", port_not_zero).unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let err = parse_toml::<Example>("port = 0", port_not_zero).unwrap_err();
        assert_eq!(err, "field `port` must not be 0");
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let err = load_toml::<Example>(&missing, port_not_zero).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("missing.toml"), "{err}");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "port = \"x\"").unwrap();
        let err = load_toml::<Example>(&bad, port_not_zero).unwrap_err();
        assert!(err.to_string().contains("bad.toml"), "{err}");
        assert!(err.to_string().contains("port"), "{err}");
    }
}
