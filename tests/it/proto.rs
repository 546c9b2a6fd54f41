//! The wire contract under buf: it lints, it has no breaking change against
//! the last released contract (proto/released/), a breaking change is
//! caught, and other languages' stubs generate from it.

use std::{path::Path, process::Command};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const RELEASED: &str = "proto/released/agentlifecycle.v1.binpb";

/// The buf binary (`$BUF`, which scripts/test.sh installs from npm); `None`
/// outside CI when it is missing. Under CI a missing buf fails the test.
fn buf() -> Option<String> {
    match std::env::var("BUF") {
        Ok(buf) if Path::new(&buf).exists() => Some(buf),
        _ if std::env::var_os("CI").is_some() => {
            panic!("BUF is not set; CI must run the buf checks")
        }
        _ => {
            eprintln!("BUF is not set: skipping a buf check");
            None
        }
    }
}

/// `buf ARGS` in `dir`: success, and what it printed.
fn run(buf: &str, dir: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(buf)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run buf");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn the_contract_lints_and_keeps_the_released_one() {
    let Some(buf) = buf() else {
        return;
    };
    let repo = Path::new(REPO);
    let (ok, text) = run(&buf, repo, &["lint"]);
    assert!(ok, "buf lint: {text}");
    let (ok, text) = run(&buf, repo, &["breaking", "--against", RELEASED]);
    assert!(ok, "buf breaking against the released contract: {text}");
}

/// Renumbering a released field is caught.
#[test]
fn a_breaking_change_is_caught() {
    let Some(buf) = buf() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let proto = dir.path().join("proto/agentlifecycle/v1");
    std::fs::create_dir_all(&proto).expect("mkdir");
    std::fs::copy(
        Path::new(REPO).join("buf.yaml"),
        dir.path().join("buf.yaml"),
    )
    .expect("copy");
    let source =
        std::fs::read_to_string(Path::new(REPO).join("proto/agentlifecycle/v1/lifecycle.proto"))
            .expect("read the contract");
    let changed = source.replacen(
        "message GetAgentRequest {\n  string agent_id = 1;",
        "message GetAgentRequest {\n  string agent_id = 7;",
        1,
    );
    assert_ne!(changed, source, "the test's edit applies");
    std::fs::write(proto.join("lifecycle.proto"), changed).expect("write");
    let against = Path::new(REPO).join(RELEASED);
    let (ok, text) = run(
        &buf,
        dir.path(),
        &["breaking", "--against", against.to_str().expect("utf-8")],
    );
    assert!(!ok, "a renumbered field must be refused: {text}");
    assert!(text.contains("GetAgentRequest"), "{text}");
}

/// Java and Python stubs generate from the module with protoc's own
/// generators (the vendored protoc; buf.gen.yaml's remote plugins need
/// network access), and the Python ones load.
#[test]
fn other_languages_generate() {
    let Some(buf) = buf() else {
        return;
    };
    let out = tempfile::tempdir().expect("tempdir");
    let template = std::fs::read_to_string(Path::new(REPO).join("tests/proto/buf.gen.local.yaml"))
        .expect("template");
    let protoc = env!("AGENT_LIFECYCLE_PROTOC");
    let template = template
        .replace(
            "    out: java\n",
            &format!("    out: java\n    protoc_path: {protoc}\n"),
        )
        .replace(
            "    out: python\n",
            &format!("    out: python\n    protoc_path: {protoc}\n"),
        );
    let template_path = out.path().join("buf.gen.yaml");
    std::fs::write(&template_path, template).expect("write the template");
    let (ok, text) = run(
        &buf,
        Path::new(REPO),
        &[
            "generate",
            "--template",
            template_path.to_str().expect("utf-8"),
            "-o",
            out.path().to_str().expect("utf-8"),
        ],
    );
    assert!(ok, "buf generate: {text}");
    let java = out
        .path()
        .join("java/dev/agentlifecycle/v1/GetAgentRequest.java");
    let java = std::fs::read_to_string(&java).unwrap_or_else(|e| panic!("{}: {e}", java.display()));
    assert!(java.contains("class GetAgentRequest"), "the Java message");
    let python = std::env::var("AGENT_LIFECYCLE_PYTHON").unwrap_or_else(|_| "python3".into());
    let check = Command::new(python)
        .arg("-c")
        .arg(
            "import sys; sys.path.insert(0, sys.argv[1]);\
             from agentlifecycle.v1 import lifecycle_pb2 as pb;\
             r = pb.GetAgentRequest(agent_id='x', as_of=pb.AsOf(sequence=3));\
             assert pb.GetAgentRequest.FromString(r.SerializeToString()).as_of.sequence == 3",
        )
        .arg(out.path().join("python"))
        .output()
        .expect("run python");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
