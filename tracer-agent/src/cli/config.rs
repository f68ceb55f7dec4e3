//! `--config FILE`: every flag of a subcommand, settable in a TOML file.
//!
//! Keys are the long flag names (`vpc-cidr = ["10.0.0.0/16"]`, `poll-interval = "1s"`,
//! `flow-table-size = 65536`). The file is turned into the flags it stands for, inserted before
//! the command line's own, so that clap checks both the same way and a flag given on the
//! command line replaces the file's value for that key.
use std::{ffi::OsString, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--config needs a file name")]
    MissingPath,
    #[error("cannot read --config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--config {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error(
        "--config {path}: key {key:?} must be a string, number, boolean or a list of them (the flags' own spelling, e.g. vpc-cidr = [\"10.0.0.0/16\"])"
    )]
    Value { path: PathBuf, key: String },
}

/// The command line with the flags the `--config` file stands for inserted after the
/// subcommand; unchanged when no `--config` is given. Also returns the file, for error notes.
pub fn expand(argv: Vec<OsString>) -> Result<(Vec<OsString>, Option<PathBuf>), ConfigError> {
    let Some(path) = config_path(&argv)? else {
        return Ok((argv, None));
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let table: toml::Table =
        text.parse()
            .map_err(|error: toml::de::Error| ConfigError::Syntax {
                path: path.clone(),
                message: error.message().to_owned(),
            })?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        let flag = format!("--{key}");
        if given(&argv, &flag) {
            continue;
        }
        let values = match value {
            toml::Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        for value in values {
            match value {
                toml::Value::Boolean(true) => flags.push(OsString::from(&flag)),
                toml::Value::Boolean(false) => {}
                toml::Value::String(text) => flags.push(format!("{flag}={text}").into()),
                toml::Value::Integer(number) => flags.push(format!("{flag}={number}").into()),
                toml::Value::Float(number) => flags.push(format!("{flag}={number}").into()),
                _ => {
                    return Err(ConfigError::Value {
                        path,
                        key: key.clone(),
                    });
                }
            }
        }
    }
    // argv[0] is the program, argv[1] the subcommand: the file's flags belong to it.
    let split = argv.len().min(2);
    let expanded = argv[..split]
        .iter()
        .cloned()
        .chain(flags)
        .chain(argv[split..].iter().cloned())
        .collect();
    Ok((expanded, Some(path)))
}

fn config_path(argv: &[OsString]) -> Result<Option<PathBuf>, ConfigError> {
    let mut args = argv.iter().map(|arg| arg.to_string_lossy());
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args
                .next()
                .map(|path| Some(PathBuf::from(path.as_ref())))
                .ok_or(ConfigError::MissingPath);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Ok(Some(PathBuf::from(path)));
        }
    }
    Ok(None)
}

/// Whether the command line itself sets `flag` (as `--flag value` or `--flag=value`).
fn given(argv: &[OsString], flag: &str) -> bool {
    argv.iter().any(|arg| {
        let arg = arg.to_string_lossy();
        arg == flag || arg.starts_with(&format!("{flag}="))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn with_file(text: &str, args: &[&str]) -> Result<Vec<String>, ConfigError> {
        let dir = std::env::temp_dir().join(format!("tracer-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        let mut full = vec!["tracer", "agent", "--config"];
        let path_text = path.to_string_lossy().into_owned();
        full.push(&path_text);
        full.extend(args);
        let result = expand(argv(&full));
        std::fs::remove_file(&path).unwrap();
        result.map(|(expanded, _)| {
            expanded
                .into_iter()
                .skip(2)
                .map(|arg| arg.to_string_lossy().into_owned())
                .filter(|arg| !arg.contains("tracer-config-") && arg != "--config")
                .collect()
        })
    }

    #[test]
    fn keys_become_flags_and_the_command_line_wins() {
        let text = r#"
            vpc-cidr = ["10.0.0.0/16", "100.64.0.0/16"]
            poll-interval = "500ms"
            flow-table-size = 4096
            json = true
            quiet = false
        "#;
        let flags = with_file(text, &["--poll-interval", "2s"]).unwrap();
        assert_eq!(
            flags,
            [
                "--flow-table-size=4096",
                "--json",
                "--vpc-cidr=10.0.0.0/16",
                "--vpc-cidr=100.64.0.0/16",
                "--poll-interval",
                "2s",
            ]
        );
    }

    #[test]
    fn bad_files_are_named() {
        let error = with_file("vpc-cidr = [", &[]).unwrap_err().to_string();
        assert!(error.contains("is not valid TOML"), "{error}");
        let error = with_file("[section]\nkey = 1", &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("key \"section\""), "{error}");
        let missing = expand(argv(&["tracer", "agent", "--config", "/nonexistent.toml"]));
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .contains("/nonexistent.toml")
        );
        assert!(matches!(
            expand(argv(&["tracer", "agent", "--config"])),
            Err(ConfigError::MissingPath)
        ));
    }

    #[test]
    fn no_config_leaves_the_command_line_alone() {
        let args = argv(&["tracer", "agent", "--vpc-cidr", "10.0.0.0/16"]);
        assert_eq!(expand(args.clone()).unwrap(), (args, None));
    }
}
