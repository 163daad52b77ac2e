//! `channel-assignment dev` prints curl lines for the REST API that work as
//! printed: run the built binary, take its lines, run them with curl.

use std::{process::Stdio, time::Duration};

use sqlx::PgPool;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::Command,
};

const BINARY: &str = env!("CARGO_BIN_EXE_channel-assignment");

#[sqlx::test]
async fn dev_prints_curl_lines_that_work_as_printed(pool: PgPool) {
    let options = pool.connect_options();
    let url = format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres"),
    );
    let mut child = Command::new(BINARY)
        .arg("dev")
        .env_clear()
        .env("DEV_DATABASE_URL", url)
        .env("GRPC_LISTEN_ADDR", "127.0.0.1:0")
        .env("HTTP_LISTEN_ADDR", "127.0.0.1:0")
        .env("METRICS_LISTEN_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("dev starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut curls = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if line.starts_with("curl ") {
                curls.push(line.clone());
            }
            // The walkthrough's last line.
            if line.starts_with("curl ") && line.ends_with("/identities/billing-agent/mailbox") {
                return;
            }
        }
        panic!("dev stopped printing before its REST lines");
    })
    .await
    .expect("dev prints its walkthrough");
    assert_eq!(curls.len(), 6, "{curls:#?}");

    let mut outputs = Vec::new();
    for line in &curls {
        let output = Command::new("sh")
            .arg("-c")
            .arg(line)
            .output()
            .await
            .expect("curl runs (apt-get install curl)");
        assert!(output.status.success(), "{line}: {output:?}");
        outputs.push(String::from_utf8(output.stdout).unwrap());
    }
    let json = |text: &str| -> serde_json::Value {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    assert_eq!(json(&outputs[0])["openapi"], "3.1.0");
    let linked = json(&outputs[1]);
    assert_eq!(linked["agent_handle"], "sales-agent");
    assert_eq!(
        linked["mailbox"]["id"],
        "5a1e5000-0000-4000-8000-000000000003"
    );
    assert_eq!(json(&outputs[2])["agent_handle"], "support-agent");
    assert_eq!(json(&outputs[3])["identities"].as_array().unwrap().len(), 2);
    assert!(outputs[4].starts_with("HTTP/1.1 204"), "{}", outputs[4]);
    assert!(outputs[5].starts_with("HTTP/1.1 404"), "{}", outputs[5]);
    assert!(
        outputs[5].contains("\"reason\":\"MAILBOX_NOT_FOUND\""),
        "{}",
        outputs[5]
    );
    child.kill().await.unwrap();
}
