//! `ricochet serve --config FILE.toml`, `RICOCHET_*` and flags: precedence, errors that name the key
//! and line, `--print-config` round trips, `/stats` shows the effective settings, and the example
//! configuration in `deploy/` is valid.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{final_counter, frame, http_get, parse_reply, temp_path, Server, BIN};

fn serve(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(BIN);
    // Only the variables a test sets: none inherited from whoever runs the tests.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RICOCHET_") {
            command.env_remove(name);
        }
    }
    let out = command
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.success(), stdout, stderr)
}

fn write_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = temp_path(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `--print-config`'s lines as (key, value text, source).
fn printed(toml_text: &str) -> Vec<(String, String, String)> {
    toml_text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (key, rest) = l.split_once(" = ").unwrap();
            let (value, source) = rest.rsplit_once("  # ").unwrap();
            (key.into(), value.into(), source.into())
        })
        .collect()
}

fn lookup<'a>(table: &'a [(String, String, String)], key: &str) -> (&'a str, &'a str) {
    let row = table.iter().find(|(k, _, _)| k == key);
    let (_, value, source) = row.unwrap_or_else(|| panic!("{key} not printed: {table:?}"));
    (value, source)
}

#[test]
fn flags_beat_the_environment_which_beats_the_file_which_beats_defaults() {
    let file = write_file(
        "layers.toml",
        "# a comment\nlisten = [\"udp://127.0.0.1:0\", \"tcp://127.0.0.1:0\"]\nbatch = 16\n\
         max-datagram = 1_024\nhttp-rate-limit = 5\nmlock = false\nhttp-idle-timeout = \"90s\"\n",
    );
    let env = [
        ("RICOCHET_MAX_DATAGRAM", "512"),
        ("RICOCHET_HTTP_RATE_LIMIT", "7"),
    ];
    let args = ["--config", file.to_str().unwrap(), "--print-config"];
    let (ok, out, err) = serve(&[&args[..], &["--http-rate-limit", "9"]].concat(), &env);
    assert!(ok, "{err}");
    let table = printed(&out);
    assert_eq!(lookup(&table, "http-rate-limit"), ("9", "flag"));
    assert_eq!(lookup(&table, "max-datagram"), ("512", "environment"));
    assert_eq!(lookup(&table, "batch"), ("16", "file"));
    assert_eq!(lookup(&table, "http-idle-timeout"), ("\"90s\"", "file"));
    assert_eq!(
        lookup(&table, "http-header-timeout"),
        ("\"10s\"", "default")
    );
    assert_eq!(lookup(&table, "mode"), ("\"kernel\"", "default"));
    assert_eq!(
        lookup(&table, "listen").0,
        "[\"udp://127.0.0.1:0\", \"tcp://127.0.0.1:0\"]"
    );
    assert!(out.contains("# cpus = (not set)"), "{out}");

    // The printed configuration is a file `--config` takes, giving the same values.
    let again = write_file("layers-printed.toml", &out);
    let args = ["--config", again.to_str().unwrap(), "--print-config"];
    let (ok, out2, err) = serve(&args, &[]);
    assert!(ok, "{err}");
    let values = |t: &[(String, String, String)]| -> Vec<(String, String)> {
        t.iter().map(|(k, v, _)| (k.clone(), v.clone())).collect()
    };
    assert_eq!(values(&printed(&out2)), values(&table));
    assert!(printed(&out2)
        .iter()
        .all(|(_, _, s)| s == "file" || s == "default"));
}

#[test]
fn the_environment_alone_configures_a_server_and_lists_split_on_commas() {
    let env = [("RICOCHET_LISTEN", "udp://127.0.0.1:0,tcp://127.0.0.1:0")];
    let (ok, out, err) = serve(&["--print-config"], &env);
    assert!(ok, "{err}");
    let table = printed(&out);
    assert_eq!(
        lookup(&table, "listen"),
        (
            "[\"udp://127.0.0.1:0\", \"tcp://127.0.0.1:0\"]",
            "environment"
        )
    );
}

#[test]
fn bad_files_name_the_key_and_line_and_exit_non_zero() {
    let cases = [
        (
            "listen = []\n\nmax-datagrams = 10\n",
            ":3: key 'max-datagrams' is not a setting",
        ),
        (
            "listen = []\nmax-datagram = 10\n",
            ":2: key 'max-datagram': invalid value '10'",
        ),
        (
            "mlock = 1\n",
            ":1: key 'mlock': invalid value '1' for '--mlock",
        ),
        (
            "batch = true\n",
            ":1: key 'batch': invalid value 'true' for '--batch",
        ),
        ("mode = [\"xdp\"]\n", ":1: key 'mode': takes one value"),
        ("mode = \"fast\"\n", ":1: key 'mode': invalid value 'fast'"),
        (
            "batch = 1.5\n",
            ":1: key 'batch': a float is not a value it takes",
        ),
        ("config = \"x.toml\"\n", ":1: key 'config' is not a setting"),
        (
            "listen = [\"udp://127.0.0.1:0\"\n",
            "TOML parse error at line 1",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let file = write_file(&format!("bad-{i}.toml"), text);
        let (ok, _, err) = serve(&["--config", file.to_str().unwrap()], &[]);
        assert!(!ok, "{text:?} was accepted");
        assert!(
            err.contains(expected),
            "{text:?}: expected {expected:?} in:\n{err}"
        );
    }
    let (ok, _, err) = serve(&["--config", "/nonexistent/ricochet.toml"], &[]);
    assert!(
        !ok && err.contains("cannot read the configuration file"),
        "{err}"
    );
    let (ok, _, err) = serve(&[], &[]);
    assert!(!ok && err.contains("no listener"), "{err}");
    let (ok, _, err) = serve(
        &["--listen", "udp://127.0.0.1:0"],
        &[("RICOCHET_BATCH", "0")],
    );
    assert!(
        !ok && err.contains("RICOCHET_BATCH: invalid value '0' for '--batch"),
        "{err}"
    );
}

#[test]
fn a_server_configured_by_file_serves_and_shows_its_settings_in_stats() {
    let file = write_file(
        "serving.toml",
        "listen = [\"udp://127.0.0.1:0\"]\nhttp = \"127.0.0.1:0\"\nmax-datagram = 1024\n",
    );
    let server = Server::start(&["--config", file.to_str().unwrap(), "--http", "127.0.0.1:0"]);
    let udp = server.addr("counter+udp");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(&frame(3), udp).unwrap();
    let mut reply = [0u8; 64];
    let (n, _) = sock.recv_from(&mut reply).unwrap();
    assert_eq!(parse_reply(&reply[..n]), 3);

    let http: SocketAddr = server
        .spec("http+http://")
        .trim_start_matches("http+http://")
        .parse()
        .unwrap();
    let (status, body) = http_get(http, "/stats");
    assert_eq!(status, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    let settings = stats["config"]["settings"].as_array().unwrap();
    let find = |key: &str| settings.iter().find(|s| s["key"] == key).unwrap().clone();
    assert_eq!(find("max-datagram")["value"], 1024);
    assert_eq!(find("max-datagram")["source"], "file");
    assert_eq!(find("http")["source"], "flag");
    assert_eq!(find("batch")["source"], "default");
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    assert_eq!(final_counter(&output), 3);
}

#[test]
fn a_flag_may_require_another_from_a_lower_layer_and_undo_a_switch() {
    let file = write_file(
        "requires.toml",
        "busy-poll = 50\nmlock = true\nlisten = []\n",
    );
    let env = [("RICOCHET_BUSY_POLL_BUDGET", "32")];
    let args = [
        "--config",
        file.to_str().unwrap(),
        "--print-config",
        "--mlock=false",
    ];
    let (ok, out, err) = serve(&args, &env);
    assert!(
        ok,
        "busy-poll-budget from the environment, busy-poll from the file: {err}"
    );
    let table = printed(&out);
    assert_eq!(lookup(&table, "busy-poll"), ("50", "file"));
    assert_eq!(lookup(&table, "busy-poll-budget"), ("32", "environment"));
    assert_eq!(lookup(&table, "mlock"), ("false", "flag"));
    // Without busy-poll anywhere, the rule still holds.
    let (ok, _, err) = serve(&["--print-config"], &env);
    assert!(!ok && err.contains("--busy-poll"), "{err}");
}

#[test]
fn values_that_start_with_a_dash_pass_through_every_layer() {
    let file = write_file("dash.toml", "http-token = \"-from-the-file\"\n");
    let args = ["--config", file.to_str().unwrap(), "--print-config"];
    let (ok, out, err) = serve(&args, &[("RICOCHET_HTTP_TOKEN", "-Zx-token")]);
    assert!(ok, "{err}");
    assert!(
        out.contains("# http-token = (secret, not shown)  # environment"),
        "{out}"
    );
    let (ok, out, err) = serve(&args, &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("# http-token = (secret, not shown)  # file"),
        "{out}"
    );
    assert!(!out.contains("from-the-file") && !err.contains("from-the-file"));
}

#[test]
fn the_http_token_is_never_printed() {
    let env = [("RICOCHET_HTTP_TOKEN", "s3cret-token")];
    let (ok, out, err) = serve(&["--listen", "udp://127.0.0.1:0", "--print-config"], &env);
    assert!(ok, "{err}");
    assert!(!out.contains("s3cret"), "{out}");
    assert!(
        out.contains("# http-token = (secret, not shown)  # environment"),
        "{out}"
    );
}

#[test]
fn the_deployment_example_is_a_valid_configuration() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ricochet.toml");
    let (ok, out, err) = serve(
        &["--config", example.to_str().unwrap(), "--print-config"],
        &[],
    );
    assert!(ok, "deploy/ricochet.toml: {err}");
    let table = printed(&out);
    assert_eq!(lookup(&table, "mode").1, "file");
    assert_eq!(lookup(&table, "iface").1, "file");
}
