//! Where the store is and who we are to it, from the standard AWS
//! conventions of the server's OS user: environment variables, then the
//! shared `config` and `credentials` files with profiles. Pure: the
//! environment and the files come in through [`Environment`].

use std::collections::HashMap;
use std::fmt;

/// Access keys; never printed ([`fmt::Debug`] hides them).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials { .. }")
    }
}

/// How to reach the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    pub region: String,
    /// `scheme://host[:port]` without a trailing slash; `None`: AWS.
    pub endpoint: Option<String>,
    pub allow_http: bool,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`.
    pub path_style: bool,
    pub credentials: Credentials,
    /// The profile the settings came from, if any (for messages).
    pub profile: Option<String>,
}

/// What the configuration is read from.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
    fn read(&self, path: &str) -> Option<String>;
    fn home(&self) -> Option<String>;
}

/// Why no configuration could be made.
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    NoCredentials(String),
    UnknownProfile(String),
    BadEndpoint(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::NoCredentials(where_) => write!(f, "no AWS credentials found ({where_})"),
            ConfigError::UnknownProfile(p) => {
                write!(
                    f,
                    "AWS profile \"{p}\" is in neither the shared config nor the credentials file"
                )
            }
            ConfigError::BadEndpoint(e) => write!(f, "invalid object store endpoint \"{e}\""),
        }
    }
}

/// Sections of an INI file: `[name]` -> key -> value. Nested blocks
/// (`s3 =` followed by indented `key = value` lines) become `s3.key`.
pub fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    let mut nested: Option<String> = None;
    for raw in text.lines() {
        let indented = raw.starts_with([' ', '\t']);
        let line = raw.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.trim().to_string());
            nested = None;
            sections.entry(name.trim().to_string()).or_default();
            continue;
        }
        let (Some(section), Some((key, value))) = (&current, line.split_once('=')) else {
            continue;
        };
        let (key, value) = (key.trim().to_ascii_lowercase(), value.trim().to_string());
        if !indented {
            nested = value.is_empty().then(|| key.clone());
        }
        let key = match (&nested, indented) {
            (Some(parent), true) => format!("{parent}.{key}"),
            _ => key,
        };
        if let Some(values) = sections.get_mut(section) {
            values.insert(key, value);
        }
    }
    sections
}

fn truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Resolve the configuration. `chosen_profile` is the per-session choice
/// (`pg_stream_export.object_store_profile`): when given, that profile's
/// credentials are used and its settings win over the environment's.
pub fn resolve(
    env: &dyn Environment,
    chosen_profile: Option<&str>,
) -> Result<StoreConfig, ConfigError> {
    let home = env.home().unwrap_or_default();
    let config_path = env
        .var("AWS_CONFIG_FILE")
        .unwrap_or(format!("{home}/.aws/config"));
    let credentials_path = env
        .var("AWS_SHARED_CREDENTIALS_FILE")
        .unwrap_or(format!("{home}/.aws/credentials"));
    let config_file = env
        .read(&config_path)
        .map(|t| parse_ini(&t))
        .unwrap_or_default();
    let credentials_file = env
        .read(&credentials_path)
        .map(|t| parse_ini(&t))
        .unwrap_or_default();
    let explicit = chosen_profile.is_some();
    let profile_name = chosen_profile
        .map(str::to_string)
        .or_else(|| env.var("AWS_PROFILE"))
        .unwrap_or_else(|| "default".to_string());
    let config_section = config_file
        .get(&format!("profile {profile_name}"))
        .or_else(|| {
            (profile_name == "default")
                .then(|| config_file.get("default"))
                .flatten()
        });
    let credentials_section = credentials_file.get(&profile_name);
    if explicit && config_section.is_none() && credentials_section.is_none() {
        return Err(ConfigError::UnknownProfile(profile_name));
    }
    let from_profile = |key: &str| -> Option<String> {
        credentials_section
            .and_then(|s| s.get(key))
            .or_else(|| config_section.and_then(|s| s.get(key)))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let from_env = |name: &str| env.var(name).filter(|v| !v.is_empty());
    // Settings: the chosen profile first, else the environment first.
    let setting = |env_names: &[&str], key: &str| -> Option<String> {
        let env_value = || env_names.iter().find_map(|n| from_env(n));
        if explicit {
            from_profile(key).or_else(env_value)
        } else {
            env_value().or_else(|| from_profile(key))
        }
    };
    let env_credentials = match (
        from_env("AWS_ACCESS_KEY_ID"),
        from_env("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(id), Some(secret)) if !explicit => Some(Credentials {
            access_key_id: id,
            secret_access_key: secret,
            session_token: from_env("AWS_SESSION_TOKEN"),
        }),
        _ => None,
    };
    let credentials = match env_credentials {
        Some(c) => c,
        None => match (from_profile("aws_access_key_id"), from_profile("aws_secret_access_key")) {
            (Some(id), Some(secret)) => Credentials {
                access_key_id: id,
                secret_access_key: secret,
                session_token: from_profile("aws_session_token"),
            },
            _ => {
                return Err(ConfigError::NoCredentials(format!(
                    "looked in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and profile \"{profile_name}\" of {credentials_path} and {config_path}"
                )))
            }
        },
    };
    let region = setting(&["AWS_REGION", "AWS_DEFAULT_REGION"], "region")
        .unwrap_or_else(|| "us-east-1".to_string());
    let endpoint = setting(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"], "endpoint_url")
        .or_else(|| from_profile("s3.endpoint_url"))
        .map(|e| e.trim_end_matches('/').to_string());
    if let Some(e) = &endpoint {
        let rest = e
            .strip_prefix("https://")
            .or_else(|| e.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.contains(['/', '?', '#', '@'])) {
            return Err(ConfigError::BadEndpoint(e.clone()));
        }
    }
    let allow_http = setting(&["AWS_ALLOW_HTTP"], "allow_http").is_some_and(|v| truthy(&v));
    let addressing = setting(&["AWS_S3_ADDRESSING_STYLE"], "s3.addressing_style")
        .map(|v| v.to_ascii_lowercase());
    let path_style = match addressing.as_deref() {
        Some("path") => true,
        Some("virtual") => false,
        // S3-compatible servers are usually reached by path.
        _ => endpoint.is_some(),
    };
    Ok(StoreConfig {
        region,
        endpoint,
        allow_http,
        path_style,
        credentials,
        profile: (explicit || credentials_section.is_some() || config_section.is_some())
            .then_some(profile_name),
    })
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    struct FakeEnv {
        vars: HashMap<String, String>,
        files: HashMap<String, String>,
    }

    impl Environment for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.vars.get(name).cloned()
        }
        fn read(&self, path: &str) -> Option<String> {
            self.files.get(path).cloned()
        }
        fn home(&self) -> Option<String> {
            Some("/home/pg".into())
        }
    }

    fn env(vars: &[(&str, &str)], files: &[(&str, &str)]) -> FakeEnv {
        FakeEnv {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            files: files
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    const CREDENTIALS: &str = "[default]\naws_access_key_id = DEFAULTKEY\naws_secret_access_key = defaultsecret\n\n[minio]\naws_access_key_id=MINIOKEY\naws_secret_access_key=miniosecret\naws_session_token = tok\n";
    const CONFIG: &str = "[default]\nregion = eu-west-1\n\n[profile minio]\nregion = us-west-2\nendpoint_url = http://127.0.0.1:9000/\nallow_http = true\ns3 =\n  addressing_style = virtual\n";

    #[test]
    fn environment_first_without_a_chosen_profile() {
        let e = env(
            &[
                ("AWS_ACCESS_KEY_ID", "ENVKEY"),
                ("AWS_SECRET_ACCESS_KEY", "envsecret"),
                ("AWS_REGION", "ap-south-1"),
                ("AWS_ENDPOINT_URL", "http://localhost:5000"),
                ("AWS_ALLOW_HTTP", "true"),
            ],
            &[
                ("/home/pg/.aws/credentials", CREDENTIALS),
                ("/home/pg/.aws/config", CONFIG),
            ],
        );
        let c = resolve(&e, None).unwrap();
        assert_eq!(c.credentials.access_key_id, "ENVKEY");
        assert_eq!(c.region, "ap-south-1");
        assert_eq!(c.endpoint.as_deref(), Some("http://localhost:5000"));
        assert!(c.allow_http && c.path_style);
        assert!(!format!("{c:?}").contains("envsecret"));
    }

    #[test]
    fn default_profile_from_files() {
        let e = env(
            &[],
            &[
                ("/home/pg/.aws/credentials", CREDENTIALS),
                ("/home/pg/.aws/config", CONFIG),
            ],
        );
        let c = resolve(&e, None).unwrap();
        assert_eq!(c.credentials.access_key_id, "DEFAULTKEY");
        assert_eq!(c.region, "eu-west-1");
        assert_eq!(c.endpoint, None);
        assert!(!c.allow_http && !c.path_style);
    }

    #[test]
    fn chosen_profile_wins_over_the_environment() {
        let e = env(
            &[
                ("AWS_ACCESS_KEY_ID", "ENVKEY"),
                ("AWS_SECRET_ACCESS_KEY", "envsecret"),
                ("AWS_REGION", "ap-south-1"),
                ("AWS_CONFIG_FILE", "/etc/aws/config"),
                ("AWS_SHARED_CREDENTIALS_FILE", "/etc/aws/credentials"),
            ],
            &[
                ("/etc/aws/credentials", CREDENTIALS),
                ("/etc/aws/config", CONFIG),
            ],
        );
        let c = resolve(&e, Some("minio")).unwrap();
        assert_eq!(c.credentials.access_key_id, "MINIOKEY");
        assert_eq!(c.credentials.session_token.as_deref(), Some("tok"));
        assert_eq!(c.region, "us-west-2");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(c.allow_http);
        assert!(!c.path_style, "addressing_style = virtual");
        assert_eq!(
            resolve(&e, Some("nope")),
            Err(ConfigError::UnknownProfile("nope".into()))
        );
        // AWS_PROFILE picks a profile too, but the environment's keys win.
        let e2 = env(
            &[("AWS_PROFILE", "minio")],
            &[
                ("/home/pg/.aws/credentials", CREDENTIALS),
                ("/home/pg/.aws/config", CONFIG),
            ],
        );
        assert_eq!(
            resolve(&e2, None).unwrap().credentials.access_key_id,
            "MINIOKEY"
        );
    }

    #[test]
    fn missing_credentials_and_bad_endpoints() {
        assert!(matches!(
            resolve(&env(&[], &[]), None),
            Err(ConfigError::NoCredentials(_))
        ));
        let e = env(
            &[
                ("AWS_ACCESS_KEY_ID", "K"),
                ("AWS_SECRET_ACCESS_KEY", "S"),
                ("AWS_ENDPOINT_URL", "ftp://x"),
            ],
            &[],
        );
        assert_eq!(
            resolve(&e, None),
            Err(ConfigError::BadEndpoint("ftp://x".into()))
        );
    }

    #[test]
    fn ini_nested_blocks_and_comments() {
        let ini = parse_ini(
            "# c\n[profile a]\ns3 =\n    addressing_style = path\nregion=x ; not a comment\n",
        );
        let a = &ini["profile a"];
        assert_eq!(a["s3.addressing_style"], "path");
        assert_eq!(a["region"], "x ; not a comment");
    }
}
