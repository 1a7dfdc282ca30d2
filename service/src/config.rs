use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::Parser;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error(
        "config file {path}: unknown setting {key:?} (settings are the long flag names, with - or _)"
    )]
    UnknownKey { path: PathBuf, key: String },
    #[error(
        "config file {path}: setting {key:?} must be a string, number, boolean or list of them"
    )]
    BadValue { path: PathBuf, key: String },
    #[error(transparent)]
    Args(#[from] clap::Error),
}

/// Parses a clap config with the precedence flags > environment > TOML file > built-in
/// defaults. The file (named by `--config <path>` or `FLEET_CONFIG`) uses the long flag names as
/// keys; its values become the flags' defaults, so one struct describes every setting once.
pub fn load_config<C: Parser>(args: impl IntoIterator<Item = OsString>) -> Result<C, ConfigError> {
    let args: Vec<OsString> = args.into_iter().collect();
    let mut command = C::command();
    if let Some(path) = config_path(&args) {
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let table: toml::Table = text.parse().map_err(|source| ConfigError::Parse {
            path: path.clone(),
            source,
        })?;
        for (key, value) in table {
            let id = key.replace('-', "_");
            if !command.get_arguments().any(|a| a.get_id() == id.as_str()) {
                return Err(ConfigError::UnknownKey { path, key });
            }
            if matches!(&value, toml::Value::Array(items) if items.is_empty()) {
                // An empty list: no values at all, not one empty value.
                command = command.mut_arg(id, |arg| arg.default_values(Vec::<&str>::new()));
                continue;
            }
            let text = value_text(&value).ok_or_else(|| ConfigError::BadValue {
                path: path.clone(),
                key: key.clone(),
            })?;
            command = command.mut_arg(id, |arg| arg.default_value(text));
        }
    }
    let matches = command.try_get_matches_from(args)?;
    Ok(C::from_arg_matches(&matches)?)
}

/// [`load_config`] for a binary's `main`: `--help` and `--version` print and exit 0, and a bad
/// flag, environment variable or config file prints why and exits 2, clap's convention for
/// usage errors (an error returned from `main` would exit 1 and prefix `--version` with
/// "Error:").
pub fn load_config_or_exit<C: Parser>() -> C {
    match load_config(std::env::args_os()) {
        Ok(config) => config,
        Err(ConfigError::Args(error)) => error.exit(),
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    }
}

/// A clap value parser for a duration that must not be zero (a timeout, say): humantime's
/// form, as every duration of every binary ("500ms", "30s", "2m").
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be more than zero".into()),
        Ok(duration) => Ok(duration),
        Err(error) => Err(error.to_string()),
    }
}

fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    // Set but empty means no file, as an unset variable does.
    std::env::var_os("FLEET_CONFIG")
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
}

fn value_text(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        // Lists become comma-separated, for flags declared with `value_delimiter = ','`.
        toml::Value::Array(items) => items
            .iter()
            .map(value_text)
            .collect::<Option<Vec<_>>>()
            .map(|parts| parts.join(",")),
        toml::Value::Datetime(_) | toml::Value::Table(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[derive(Debug, Parser)]
    struct Example {
        /// Optional file of settings.
        #[arg(long, env = "FLEET_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "EXAMPLE_BATCH", default_value_t = 32)]
        max_batch: usize,
        #[arg(long, env = "EXAMPLE_NAME", default_value = "builtin")]
        name: String,
        #[arg(long, value_delimiter = ',', default_value = "a")]
        models: Vec<String>,
    }

    fn file(text: &str) -> tempfile_path::TempFile {
        tempfile_path::TempFile::new(text)
    }

    mod tempfile_path {
        use super::*;
        pub struct TempFile(pub PathBuf);
        impl TempFile {
            pub fn new(text: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "fleet-config-test-{}-{:?}.toml",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let mut f = std::fs::File::create(&path).expect("temp file");
                f.write_all(text.as_bytes()).expect("write");
                TempFile(path)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn args(extra: &[&str]) -> Vec<OsString> {
        std::iter::once("prog")
            .chain(extra.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn file_values_override_defaults_and_flags_override_the_file() {
        let f = file("max-batch = 64\nname = \"from-file\"\nmodels = [\"x\", \"y\"]\n");
        let path = f.0.to_string_lossy().to_string();
        let from_file: Example = load_config(args(&["--config", &path])).unwrap();
        assert_eq!(from_file.max_batch, 64);
        assert_eq!(from_file.name, "from-file");
        assert_eq!(from_file.models, ["x", "y"]);
        let flagged: Example = load_config(args(&["--config", &path, "--max-batch", "8"])).unwrap();
        assert_eq!(flagged.max_batch, 8);
        assert_eq!(flagged.name, "from-file");
        let builtin: Example = load_config(args(&[])).unwrap();
        assert_eq!(builtin.max_batch, 32);
        assert_eq!(builtin.name, "builtin");
        assert_eq!(builtin.models, ["a"]);
    }

    #[test]
    fn an_empty_list_in_the_file_means_no_values() {
        let f = file("models = []\n");
        let path = f.0.to_string_lossy().to_string();
        let empty: Example = load_config(args(&["--config", &path])).unwrap();
        assert!(empty.models.is_empty(), "{:?}", empty.models);
    }

    #[test]
    fn unknown_keys_and_bad_files_are_typed_errors() {
        let f = file("max_batchh = 64\n");
        let path = f.0.to_string_lossy().to_string();
        let err = load_config::<Example>(args(&["--config", &path])).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKey { ref key, .. } if key == "max_batchh"));
        let f = file("max_batch = [\n");
        let path = f.0.to_string_lossy().to_string();
        let err = load_config::<Example>(args(&["--config", &path])).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        let f = file("max_batch = \"many\"\n");
        let path = f.0.to_string_lossy().to_string();
        let err = load_config::<Example>(args(&["--config", &path])).unwrap_err();
        assert!(matches!(err, ConfigError::Args(_)));
        let err =
            load_config::<Example>(args(&["--config", "/nonexistent/fleet.toml"])).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
    }
}
