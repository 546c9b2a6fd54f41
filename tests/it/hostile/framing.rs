//! Broken gRPC framing.

use super::*;

// ---------------------------------------------------------------------------
// Broken gRPC framing

/// What a broken framing case must get.
#[derive(Clone, Copy, Debug)]
pub(super) enum Framed {
    /// This code, with a message starting with this text.
    Status(Code, &'static str),
    /// The answer to the well-formed message alone.
    AsOneMessage,
}

/// Request bodies whose gRPC framing is broken, sent to every RPC: each
/// gets the status tonic's framing rules call for (OUT_OF_RANGE for a
/// message declared over 1 MiB, before any of it is read; UNIMPLEMENTED for
/// an unsupported compression; INTERNAL for a protocol violation), and the
/// server keeps serving.
#[tokio::test]
pub(super) async fn broken_grpc_framing_gets_a_status() {
    let mut server = start_server();
    let mut client = server.client().await;
    let bystanders = Bystanders::create(&mut client).await;
    let channel = common::channel(&server.url()).await;
    // Field 1 is a string (or packed enums) in every request with fields.
    let message = Wire::new().bytes(1, b"not-a-uuid").0;
    let len = message.len() as u32;
    let one = raw::frame(0, len, &message);
    let over = MAX_REQUEST_BYTES as u32 + 1;
    let eof = Framed::Status(Code::Internal, "Unexpected EOF decoding stream");
    let protocol = Framed::Status(Code::Internal, "protocol error");
    let too_large = Framed::Status(Code::OutOfRange, "Error, decoded message length too large");
    let unsupported = Framed::Status(Code::Unimplemented, "Content is compressed with");
    type Headers = &'static [(&'static str, &'static str)];
    let cases: Vec<(&str, Headers, Bytes, Framed)> = vec![
        (
            "no message",
            &[],
            Bytes::new(),
            Framed::Status(Code::Internal, "Missing request message"),
        ),
        (
            "3 bytes of a header",
            &[],
            Bytes::from_static(&[0, 0, 0]),
            eof,
        ),
        (
            "a header declaring 4 GiB",
            &[],
            raw::frame(0, u32::MAX, &[]),
            too_large,
        ),
        (
            "a header declaring 1 MiB + 1",
            &[],
            raw::frame(0, over, b"abc"),
            too_large,
        ),
        (
            "100 bytes declared, 10 sent",
            &[],
            raw::frame(0, 100, &[0; 10]),
            eof,
        ),
        (
            "compression flag 7",
            &[],
            raw::frame(7, len, &message),
            protocol,
        ),
        (
            "compressed without grpc-encoding",
            &[],
            raw::frame(1, len, &message),
            protocol,
        ),
        (
            "gzip flag, not gzip",
            &[("grpc-encoding", "gzip")],
            raw::frame(1, len, &message),
            unsupported,
        ),
        (
            "unknown grpc-encoding",
            &[("grpc-encoding", "snappy-xyz")],
            raw::frame(1, len, &message),
            unsupported,
        ),
        (
            "two messages",
            &[],
            [one.clone(), one.clone()].concat().into(),
            Framed::AsOneMessage,
        ),
        (
            "a message, then 2 bytes",
            &[],
            [&one[..], &[9, 9]].concat().into(),
            eof,
        ),
    ];
    let mut failures = Vec::new();
    for method in methods() {
        let alone = raw::http_call(&channel, &method.name, &[], one.clone(), STEP)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", method.name));
        for (kind, headers, body, expect) in &cases {
            let expect = match (method.shape, *kind) {
                // A client stream may end after its last message...
                (Shape::ClientStreaming, "no message") => Framed::Status(Code::Ok, ""),
                // ...and is answered at its first bad message, before the
                // broken frame after it is read.
                (Shape::ClientStreaming, "a message, then 2 bytes") => Framed::AsOneMessage,
                // A method whose field 1 is not a string (a Duration, in the
                // analytics requests) cannot decode the message itself, and
                // says so before it sees the bytes after it.
                (_, "a message, then 2 bytes") if is_decode_error(&alone) => Framed::AsOneMessage,
                _ => *expect,
            };
            let (code, prefix) = match expect {
                Framed::Status(code, prefix) => (code, prefix),
                Framed::AsOneMessage => (alone.code(), ""),
            };
            match raw::http_call(&channel, &method.name, headers, body.clone(), STEP).await {
                Ok(status) if status.code() == code && status.message().starts_with(prefix) => {}
                Ok(status) => failures.push(format!(
                    "{} / {kind}: expected {code:?} \"{prefix}...\", got {:?} {:?}",
                    method.name,
                    status.code(),
                    status.message()
                )),
                Err(e) => failures.push(format!("{} / {kind}: no status: {e}", method.name)),
            }
        }
        server.assert_running();
    }
    assert!(
        failures.is_empty(),
        "{}{}",
        failures.join("\n"),
        server.log()
    );
    assert_survived(&mut server, &bystanders).await;
}
