//! The durable store on a full disk and on a read-only file system.
//!
//! These tests mount small tmpfs file systems, so they need root (CI runs
//! as root); they fail, rather than skip, without it.

use crate::common;

use std::{path::Path, process::Command, sync::Arc};

use agent_lifecycle::{
    api::grpc::pb,
    service::ServiceConfig,
    store::{SqliteStore, Store},
};
use common::TestServer;
use tonic::Code;
use tonic_types::StatusExt;

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root; run the suite as root (as CI does)"
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount_read_only(&self) {
        let status = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.path())
            .status()
            .expect("run mount");
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// When the disk fills up, the failing write gets UNAVAILABLE
/// (STORE_UNAVAILABLE), nothing of it is applied, reads keep working, and
/// every acknowledged registration is in the database file.
#[tokio::test]
async fn full_disk_fails_the_write_and_keeps_every_acknowledged_one() {
    let fs = Tmpfs::mount("1m");
    let db = fs.path().join("full.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).expect("open"));
    let server = TestServer::start_on(store, ServiceConfig::default()).await;
    let mut c = server.client().await;
    let mut acked = Vec::new();
    let failure = loop {
        assert!(acked.len() < 100_000, "a 1 MiB file system fills up");
        let id = uuid::Uuid::new_v4().to_string();
        let request = pb::RegisterAgentRequest {
            agent_id: id.clone(),
            name: "n".repeat(200),
            reason: "r".repeat(500),
            ..Default::default()
        };
        match c.register_agent(request).await {
            Ok(_) => acked.push(id),
            Err(status) => break (id, status),
        }
    };
    let (failed_id, status) = failure;
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert_eq!(
        status.get_details_error_info().expect("info").reason,
        "STORE_UNAVAILABLE"
    );
    let err = c
        .get_agent(pb::GetAgentRequest {
            agent_id: failed_id,
            ..Default::default()
        })
        .await
        .expect_err("not applied");
    assert_eq!(err.code(), Code::NotFound);
    for id in acked.iter().step_by(37) {
        c.get_agent(pb::GetAgentRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("still readable");
    }
    let _ = server.shutdown().await;

    // Copy the database off the full file system and check it.
    let copy = tempfile::tempdir().expect("tempdir");
    for suffix in ["", "-wal"] {
        let from = fs.path().join(format!("full.db{suffix}"));
        if from.exists() {
            std::fs::copy(&from, copy.path().join(format!("full.db{suffix}"))).expect("copy");
        }
    }
    let reopened = SqliteStore::open(copy.path().join("full.db")).expect("reopen the copy");
    let loaded = reopened.load().expect("load");
    let stored: std::collections::HashSet<String> =
        loaded.agents.iter().map(|a| a.id.to_string()).collect();
    assert!(acked.len() > 10);
    for id in &acked {
        assert!(stored.contains(id), "acknowledged {id} is durable");
    }
}

/// A read-only data directory is a clear error at start-up, in the library
/// and in the binary, whether the file exists or not.
#[test]
fn read_only_data_directory_fails_at_start_up() {
    let fs = Tmpfs::mount("4m");
    let existing = fs.path().join("existing.db");
    SqliteStore::open(&existing)
        .expect("create")
        .close()
        .expect("close");
    fs.remount_read_only();
    assert!(SqliteStore::open(&existing).is_err());
    assert!(SqliteStore::open(fs.path().join("new.db")).is_err());
    assert!(SqliteStore::open(fs.path().join("sub/new.db")).is_err());

    let output = Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(format!("sqlite://{}", existing.display()))
        .output()
        .expect("run the server");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot open the store"), "{stderr}");
    assert!(output.stdout.is_empty(), "it never started listening");
}
