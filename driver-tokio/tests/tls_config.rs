//! A `CONSUL_CACERT` file or `CONSUL_CAPATH` directory without a certificate is a configuration
//! error naming the variable and the path, not a silent fall back to the system's roots.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use consul_lock_tokio::{Client, ClientConfig, Error};

/// A fresh scratch directory for `test`.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("consul-lock-tls-config-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn client(var: &str, path: &std::path::Path) -> Result<Client, Error> {
    let vars = [
        ("CONSUL_HTTP_ADDR", "https://127.0.0.1:8501".to_owned()),
        (var, path.display().to_string()),
    ];
    Client::new(ClientConfig::from_env_vars(vars, |_: &std::path::Path| unreachable!()).unwrap())
}

fn assert_names(result: Result<Client, Error>, var: &str, path: &std::path::Path) {
    let Err(e @ Error::Tls { .. }) = result else {
        panic!("{var} without a certificate must be refused, got {result:?}")
    };
    let text = e.to_string();
    assert!(text.contains(var), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(
        text.contains("no PEM certificate") || text.contains("no file with a PEM certificate"),
        "{text}"
    );
}

#[test]
fn a_ca_file_without_a_certificate_is_refused() {
    let dir = scratch("cacert");
    let file = dir.join("ca.pem");
    std::fs::write(&file, "not a certificate\n").unwrap();
    assert_names(client("CONSUL_CACERT", &file), "CONSUL_CACERT", &file);
    std::fs::write(&file, "").unwrap();
    assert_names(client("CONSUL_CACERT", &file), "CONSUL_CACERT", &file);
}

#[test]
fn a_ca_directory_without_a_certificate_is_refused() {
    let dir = scratch("capath");
    assert_names(client("CONSUL_CAPATH", &dir), "CONSUL_CAPATH", &dir);
    std::fs::write(dir.join("README"), "certificates go here\n").unwrap();
    assert_names(client("CONSUL_CAPATH", &dir), "CONSUL_CAPATH", &dir);
}
