//! Bad configuration stops both binaries before they touch the broker, naming the key.

mod support;

use support::binary;

async fn refuse(program: &str, args: &[&str], env: &[(&str, &str)], key: &str) {
    let output = tokio::process::Command::new(binary(program))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{program} {args:?}: {stderr}"
    );
    assert!(
        stderr.contains(key),
        "{program} {args:?} should name {key}: {stderr}"
    );
}

#[tokio::test]
async fn invalid_values_are_refused_naming_their_key() {
    refuse(
        "warren-consumer",
        &["--uri", "http://nope"],
        &[],
        "amqp.uri",
    )
    .await;
    refuse(
        "warren-consumer",
        &["--failure-rate", "2"],
        &[],
        "product.failure_rate",
    )
    .await;
    refuse(
        "warren-consumer",
        &["--prefetch", "0"],
        &[],
        "bridge.prefetch",
    )
    .await;
    refuse(
        "warren-consumer",
        &["--queue-type", "stream"],
        &[],
        "queue_type",
    )
    .await;
    refuse(
        "warren-consumer",
        &[],
        &[(
            "WARREN_DELIVERY__CONSUMER_CONTROLLER__FLOW_CONTROL_WINDOW",
            "0",
        )],
        "delivery.consumer_controller.flow_control_window",
    )
    .await;
    refuse(
        "warren-consumer",
        &[],
        &[("WARREN_BRIDGE__MAX_IN_FLIGHTT", "3")],
        "max_in_flightt",
    )
    .await;
    refuse(
        "warren-producer",
        &["--products", ","],
        &[],
        "publish.products",
    )
    .await;
}

#[tokio::test]
async fn tls_misconfigurations_are_refused_naming_their_key() {
    let empty = std::env::temp_dir().join(format!("warren-cli-tls-{}.pem", std::process::id()));
    std::fs::write(&empty, "no PEM in here").unwrap();
    let empty = support::path(&empty);
    for program in ["warren-consumer", "warren-producer"] {
        // A CA for a link that is not TLS.
        refuse(program, &["--amqp-ca-file", empty], &[], "`amqp.tls`").await;
        // A file without a certificate.
        let tls_uri = [
            "--uri",
            "amqps://127.0.0.1:5671/%2f",
            "--amqp-ca-file",
            empty,
        ];
        refuse(program, &tls_uri, &[], "amqp.tls.ca_file").await;
        // EXTERNAL without a client certificate.
        let external = [
            "--uri",
            "amqps://127.0.0.1:5671/%2f?auth_mechanism=external",
        ];
        refuse(program, &external, &[], "amqp.tls.cert_file").await;
    }
    // Half a node identity, and a CA file that holds none.
    refuse(
        "warren-consumer",
        &["--cluster-cert-file", empty],
        &[],
        "cluster.tls.ca_file",
    )
    .await;
    let node = [
        "--cluster-ca-file",
        empty,
        "--cluster-cert-file",
        empty,
        "--cluster-key-file",
        empty,
    ];
    refuse("warren-consumer", &node, &[], "cluster.tls.ca_file").await;
    // libpq's modes only, and a root certificate that exists.
    let bogus = "postgres://127.0.0.1/x?sslmode=verify-everything";
    refuse(
        "warren-consumer",
        &["--entity-store", bogus],
        &[],
        "entity_store",
    )
    .await;
    let missing = "postgres://127.0.0.1/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem";
    refuse(
        "warren-consumer",
        &["--entity-store", missing],
        &[],
        "entity_store",
    )
    .await;
}

#[tokio::test]
async fn a_missing_config_file_is_refused() {
    refuse(
        "warren-producer",
        &["--config", "/nonexistent.toml"],
        &[],
        "/nonexistent.toml",
    )
    .await;
}

#[tokio::test]
async fn help_documents_every_flag_with_its_environment_twin() {
    for program in ["warren-consumer", "warren-producer"] {
        let output = tokio::process::Command::new(binary(program))
            .arg("--help")
            .output()
            .await
            .unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success());
        let flags = help
            .lines()
            .filter(|l| l.trim_start().starts_with("--"))
            .count();
        let twins = help.matches("[env: WARREN_").count();
        assert!(flags > 5, "{program} --help lists its flags: {help}");
        // Every long flag (-h/--help and -V/--version are listed as short ones) names its
        // environment variable.
        assert_eq!(twins, flags, "{program} --help: {help}");
    }
}

/// One environment commonly serves both binaries: each skips the other's `WARREN_` sections (the
/// error below is about the binary's own key, not the other's section), yet still refuses a
/// misspelt section of its own.
#[tokio::test]
async fn each_binary_skips_the_other_binarys_environment_but_not_a_misspelt_section() {
    refuse(
        "warren-producer",
        &["--products", ","],
        &[
            ("WARREN_CLUSTER__SECRET", "a-secret-for-the-consumers-only"),
            ("WARREN_BRIDGE__MAX_IN_FLIGHT", "10"),
            ("WARREN_ENTITY_STORE", "memory"),
            ("WARREN_DATA_DIR", "/var/lib/warren"),
        ],
        "publish.products",
    )
    .await;
    refuse(
        "warren-consumer",
        &["--prefetch", "0"],
        &[("WARREN_PUBLISH__RATE", "5")],
        "bridge.prefetch",
    )
    .await;
    refuse(
        "warren-producer",
        &[],
        &[("WARREN_PUBLISHH__RATE", "5")],
        "publishh",
    )
    .await;
}

/// `WARREN_CONFIG` is `--config`'s twin, not a setting: the file it names is read.
#[tokio::test]
async fn the_config_file_can_be_named_by_its_environment_variable() {
    let file = std::env::temp_dir().join(format!("warren-cli-{}.toml", std::process::id()));
    std::fs::write(&file, "[publish]\nproducts = \",\"\n").unwrap();
    let path = file.to_string_lossy().into_owned();
    refuse(
        "warren-producer",
        &[],
        &[("WARREN_CONFIG", path.as_str())],
        "publish.products",
    )
    .await;
    let _ = std::fs::remove_file(&file);
}
