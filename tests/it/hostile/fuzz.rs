//! Random and mutated request bytes to every method.

use super::*;

// ---------------------------------------------------------------------------
// Random and mutated request bytes

/// What the server must answer to a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expect {
    /// Any answer a client can get for some input: a client code or the
    /// decoder's INTERNAL.
    AnyStatus,
    /// The bytes are a valid request message: anything but a decode error.
    Decodes,
    /// The bytes are not a valid request message: the decoder's INTERNAL.
    DecodeError,
}

pub(super) struct Case {
    kind: &'static str,
    body: Vec<u8>,
    expect: Expect,
}

/// Text for a string field: the target's id, other ids, words the server
/// knows, random and long text.
pub(super) fn random_text(rng: &mut Rng, target: &str) -> String {
    const WORDS: [&str; 12] = [
        "docker",
        "kubernetes",
        "hf_space",
        "running",
        "CrashLoopBackOff",
        "PAUSED",
        "exited",
        "agents.v1.00000000000000000000000000000000",
        "history.v1.0.5",
        "00000000-0000-0000-0000-000000000000",
        "\u{1f980}\u{e9}\u{0}",
        " ",
    ];
    match rng.below(8) {
        0 | 1 => target.to_string(),
        2 => String::new(),
        3 => rng.pick(&WORDS).to_string(),
        4 => {
            let b = rng.bytes(16);
            let h = raw::hex(&b, 16);
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }
        5 => {
            let len = 256 + rng.below(4000);
            "x".repeat(len)
        }
        _ => {
            let len = rng.below(300);
            (0..len)
                .map(|_| char::from(b' ' + (rng.below(95) as u8)))
                .collect()
        }
    }
}

/// A varint: small numbers, enum edges, and the extremes of every width.
pub(super) fn random_varint(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0..=2 => rng.below(20) as u64,
        3 => *rng.pick(&[
            i32::MAX as u64,
            u32::MAX as u64,
            1 << 31,
            1 << 32,
            i64::MAX as u64,
            u64::MAX,
        ]),
        // A negative int32, as protobuf encodes it: ten bytes.
        4 => (-(1 + rng.below(1000) as i64)) as u64,
        _ => rng.next_u64() >> rng.below(64),
    }
}

/// Metadata up to `depth` levels deep, with every kind of value.
pub(super) fn random_struct(rng: &mut Rng, depth: usize) -> Struct {
    let mut fields = std::collections::BTreeMap::new();
    for i in 0..rng.below(5) {
        let kind = match rng.below(if depth == 0 { 5 } else { 7 }) {
            0 => Kind::NullValue(rng.below(3) as i32),
            1 => Kind::BoolValue(rng.chance(50)),
            2 => {
                let bits = f64::from_bits(rng.next_u64());
                Kind::NumberValue(*rng.pick(&[0.5, -1.0, f64::MAX, f64::NAN, f64::INFINITY, bits]))
            }
            3 | 4 => Kind::StringValue(random_text(rng, "")),
            5 => Kind::StructValue(random_struct(rng, depth - 1)),
            _ => Kind::ListValue(ListValue {
                values: random_struct(rng, depth - 1).fields.into_values().collect(),
            }),
        };
        fields.insert(format!("k{i}"), Value { kind: Some(kind) });
    }
    Struct { fields }
}

/// A well-formed request message with random values in random fields,
/// built from the request type's descriptor.
pub(super) fn random_request(rng: &mut Rng, method: &Method, target: &str) -> Vec<u8> {
    use prost_types::field_descriptor_proto::{Label, Type};
    let mut out = Wire::new();
    for field in &method.input.field {
        if rng.chance(30) {
            continue;
        }
        let number = field.number() as u32;
        let repeats = match field.label() {
            Label::Repeated => rng.below(4),
            _ => 1,
        };
        for _ in 0..repeats {
            out = match field.r#type() {
                Type::String => out.bytes(number, random_text(rng, target).as_bytes()),
                Type::Bool | Type::Enum | Type::Uint32 | Type::Uint64 | Type::Int32 => {
                    out.uint(number, random_varint(rng))
                }
                Type::Double => {
                    let value = *rng.pick(&[0.5, f64::NAN, f64::NEG_INFINITY, -0.0, f64::MAX]);
                    out.key(number, wire::FIXED64).raw(&value.to_le_bytes())
                }
                Type::Message if field.type_name() == ".google.protobuf.Struct" => {
                    out.bytes(number, &random_struct(rng, 3).encode_to_vec())
                }
                Type::Message if field.type_name() == ".google.protobuf.Duration" => {
                    // Seconds and nanos, valid or not (negative, huge).
                    let duration = Wire::new()
                        .uint(1, random_varint(rng))
                        .uint(2, random_varint(rng));
                    out.bytes(number, &duration.0)
                }
                Type::Message if field.type_name() == ".agentlifecycle.v1.AsOf" => {
                    // A sequence or a time (seconds and nanos, valid or not).
                    let point = if rng.below(2) == 0 {
                        Wire::new().uint(1, random_varint(rng))
                    } else {
                        let time = Wire::new()
                            .uint(1, random_varint(rng))
                            .uint(2, random_varint(rng));
                        Wire::new().bytes(2, &time.0)
                    };
                    out.bytes(number, &point.0)
                }
                Type::Message if field.type_name().ends_with("Entry") => {
                    let key = random_text(rng, "");
                    let value = random_text(rng, "");
                    let entry = Wire::new()
                        .bytes(1, key.as_bytes())
                        .bytes(2, value.as_bytes());
                    out.bytes(number, &entry.0)
                }
                other => panic!(
                    "{}.{}: no random values of type {other:?} ({})",
                    method.input.name(),
                    field.name(),
                    field.type_name()
                ),
            };
        }
    }
    out.0
}

/// Byte sequences that are not UTF-8.
pub(super) fn invalid_utf8(rng: &mut Rng) -> Vec<u8> {
    let fixed: [&[u8]; 6] = [
        b"\xff",
        b"\xc0\x80",
        b"\xed\xa0\x80",
        b"agent\x80",
        b"\xf4\x90\x80\x80",
        b"\xe2\x82",
    ];
    if rng.chance(70) {
        return rng.pick(&fixed).to_vec();
    }
    loop {
        let len = 1 + rng.below(64);
        let bytes = rng.bytes(len);
        if std::str::from_utf8(&bytes).is_err() {
            return bytes;
        }
    }
}

/// A field number the request message does not have.
pub(super) fn unknown_field(rng: &mut Rng, method: &Method) -> u32 {
    loop {
        let field = match rng.below(3) {
            0 => 16 + rng.below(100) as u32,
            1 => 1000 + rng.below(100_000) as u32,
            _ => (1 << 29) - 1 - rng.below(10) as u32,
        };
        if !method.fields.contains(&(field as i32)) {
            return field;
        }
    }
}

/// One case for `method`: a random well-formed request, random bytes, or
/// a well-formed request (one of `samples`, about `target`) mutated.
pub(super) fn case(rng: &mut Rng, method: &Method, samples: &[Vec<u8>], target: &str) -> Case {
    let sample = rng.pick(samples).clone();
    let with = |tail: Wire| {
        let mut body = sample.clone();
        body.extend_from_slice(&tail.0);
        body
    };
    match rng.below(20) {
        16..=19 => Case {
            kind: "random well-formed request",
            body: random_request(rng, method, target),
            expect: Expect::Decodes,
        },
        0 | 1 => {
            let len = if rng.chance(50) {
                rng.below(64)
            } else {
                rng.below(4097)
            };
            Case {
                kind: "random bytes",
                body: rng.bytes(len),
                expect: Expect::AnyStatus,
            }
        }
        2 => {
            let mut body = sample;
            for _ in 0..1 + rng.below(8) {
                if body.is_empty() {
                    body.push(rng.byte());
                }
                let at = rng.below(body.len());
                body[at] ^= 1 << rng.below(8);
            }
            Case {
                kind: "flipped bits",
                body,
                expect: Expect::AnyStatus,
            }
        }
        3 => {
            let mut body = sample;
            body.truncate(rng.below(body.len() + 1));
            Case {
                kind: "truncated",
                body,
                expect: Expect::AnyStatus,
            }
        }
        4 => {
            let mut body = sample;
            let at = rng.below(body.len() + 1);
            let len = 1 + rng.below(16);
            let inserted = rng.bytes(len);
            body.splice(at..at, inserted);
            Case {
                kind: "inserted bytes",
                body,
                expect: Expect::AnyStatus,
            }
        }
        5 => {
            let field = unknown_field(rng, method);
            let tail = match rng.below(4) {
                0 => Wire::new().uint(field, rng.next_u64()),
                // -1 as a 10-byte varint.
                1 => Wire::new().uint(field, u64::MAX),
                2 => Wire::new().key(field, wire::FIXED64).raw(&rng.bytes(8)),
                _ => {
                    let len = rng.below(300);
                    Wire::new().bytes(field, &rng.bytes(len))
                }
            };
            Case {
                kind: "unknown field",
                body: with(tail),
                expect: Expect::Decodes,
            }
        }
        6 => {
            // Field 1 as fixed32: every request's field 1 is a string, a
            // repeated string or a repeated enum.
            let has_field_1 = method.fields.contains(&1);
            Case {
                kind: "field 1 with the wrong wire type",
                body: with(Wire::new().key(1, wire::FIXED32).raw(&rng.bytes(4))),
                expect: if has_field_1 {
                    Expect::DecodeError
                } else {
                    Expect::Decodes
                },
            }
        }
        7 => Case {
            kind: "11-byte varint as a key",
            body: with(Wire::new().raw(&[0xff; 10]).raw(&[0x01])),
            expect: Expect::DecodeError,
        },
        8 => {
            let field = 1 + rng.below(8) as u32;
            let declared = 100 + rng.below(1_000_000) as u64;
            let present = rng.below(50);
            let tail = Wire::new()
                .key(field, wire::LEN)
                .varint(declared)
                .raw(&rng.bytes(present));
            Case {
                kind: "length past the end",
                body: with(tail),
                expect: Expect::DecodeError,
            }
        }
        9 => {
            let bad = invalid_utf8(rng);
            match method.string_field {
                Some(field) => Case {
                    kind: "invalid UTF-8 in a string field",
                    body: with(Wire::new().bytes(field, &bad)),
                    expect: Expect::DecodeError,
                },
                None => Case {
                    kind: "invalid UTF-8 in an unknown field",
                    body: with(Wire::new().bytes(unknown_field(rng, method), &bad)),
                    expect: Expect::Decodes,
                },
            }
        }
        10 => {
            let wire_type = 6 + rng.below(2) as u8;
            Case {
                kind: "invalid wire type",
                body: with(
                    Wire::new()
                        .key(1 + rng.below(20) as u32, wire_type)
                        .varint(1),
                ),
                expect: Expect::DecodeError,
            }
        }
        11 => Case {
            kind: "field number 0",
            body: with(Wire::new().key(0, wire::VARINT).varint(1)),
            expect: Expect::DecodeError,
        },
        12 => {
            let other = rng.pick(samples).clone();
            Case {
                kind: "two requests concatenated",
                body: with(Wire::new().raw(&other)),
                expect: Expect::Decodes,
            }
        }
        13 => {
            let field = unknown_field(rng, method);
            let mut tail = Wire::new();
            for i in 0..2000 {
                tail = tail.uint(field, i);
            }
            Case {
                kind: "2000 unknown fields",
                body: with(tail),
                expect: Expect::Decodes,
            }
        }
        14 => {
            // Unknown groups nested past the decoder's recursion limit.
            let field = unknown_field(rng, method);
            let depth = 200 + rng.below(2000);
            let mut tail = Wire::new();
            for _ in 0..depth {
                tail = tail.key(field, wire::START_GROUP);
            }
            for _ in 0..depth {
                tail = tail.key(field, 4);
            }
            Case {
                kind: "unknown groups nested 200+ deep",
                body: with(tail),
                expect: Expect::DecodeError,
            }
        }
        _ => Case {
            kind: "length near 2^64",
            body: with(
                Wire::new()
                    .key(unknown_field(rng, method), wire::LEN)
                    .varint(u64::MAX - rng.below(1000) as u64),
            ),
            expect: Expect::DecodeError,
        },
    }
}

/// Sends `body` as `method`'s request message (for a client-streaming
/// method, `copies` times): the response message, `None` for an open
/// server stream (dropped unread), or the status.
pub(super) async fn send_raw(
    raw: &mut RawClient,
    method: &Method,
    body: Bytes,
    copies: usize,
) -> Result<Option<Bytes>, Status> {
    let name = method.name.as_str();
    let call = async {
        match method.shape {
            Shape::Unary => raw.unary(name, body).await.map(Some),
            Shape::ClientStreaming => raw
                .client_streaming(name, vec![body; copies])
                .await
                .map(Some),
            Shape::ServerStreaming => raw.server_streaming(name, body).await.map(|_| None),
        }
    };
    timed(name, call).await
}

/// Why the answer to `case` is wrong, if it is.
pub(super) fn judge(
    method: &Method,
    case: &Case,
    answer: &Result<Option<Bytes>, Status>,
) -> Option<String> {
    match answer {
        Ok(response) => {
            if let Some(bytes) = response
                && let Err(why) = is_response(&method.name, bytes)
            {
                return Some(format!(
                    "OK with bytes that are not a {} response ({why}): {}",
                    method.name,
                    raw::hex(bytes, 64)
                ));
            }
            (case.expect == Expect::DecodeError)
                .then(|| "OK for bytes that are not a valid request message".to_string())
        }
        Err(status) if is_decode_error(status) => (case.expect == Expect::Decodes).then(|| {
            format!(
                "a valid request message refused as undecodable: {}",
                status.message()
            )
        }),
        Err(status) if case.expect == Expect::DecodeError => Some(format!(
            "expected the decoder's INTERNAL, got {:?}: {}",
            status.code(),
            status.message()
        )),
        Err(status) if CLIENT_CODES.contains(&status.code()) => None,
        Err(status) => Some(format!(
            "answered {:?}: {}",
            status.code(),
            status.message()
        )),
    }
}

/// Every RPC, fed a few hundred random and mutated request messages: each
/// gets a proper status (never UNKNOWN, UNAVAILABLE or a broken stream),
/// INTERNAL only from the decoder and exactly for bytes that are not a
/// request message, and successes carry a response message.
#[tokio::test]
pub(super) async fn random_and_mutated_bytes_to_every_method() {
    let seed = seed();
    println!("seed {seed:#x} (HOSTILE_SEED={seed:#x} replays it)");
    let mut server = start_server();
    let mut client = server.client().await;
    let bystanders = Bystanders::create(&mut client).await;
    let target = online(&mut client, &[("team", "fuzz")]).await.agent_id;
    let mut raw = RawClient::new(common::channel(&server.url()).await);

    let before = server.resident_memory();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut tally: HashMap<(String, Code), usize> = HashMap::new();
    for method in methods() {
        let samples = samples(&method.name, &target);
        let mut rng = Rng::new(seed ^ fnv(&method.name));
        for index in 0..CASES_PER_METHOD {
            let case = case(&mut rng, &method, &samples, &target);
            let copies = 1 + rng.below(3);
            let answer = send_raw(&mut raw, &method, case.body.clone().into(), copies).await;
            let code = answer.as_ref().map_or_else(Status::code, |_| Code::Ok);
            *tally.entry((method.name.clone(), code)).or_default() += 1;
            if let Some(why) = judge(&method, &case, &answer) {
                failures.push(format!(
                    "{} case {index} ({}, {:?}): {why}\n  request bytes: {}",
                    method.name,
                    case.kind,
                    case.expect,
                    raw::hex(&case.body, 128)
                ));
            }
        }
        server.assert_running();
    }
    let mut codes: Vec<_> = tally
        .into_iter()
        .map(|((method, code), n)| format!("{method} {code:?} {n}"))
        .collect();
    codes.sort();
    println!("answers per method and code: {codes:?}");
    let after = server.resident_memory();
    println!(
        "random cases took {:?}; resident memory {:.1} MiB before, {:.1} MiB after",
        started.elapsed(),
        mib(before),
        mib(after)
    );
    assert!(
        failures.is_empty(),
        "{} wrong answers (seed {seed:#x}):\n{}{}",
        failures.len(),
        failures.join("\n"),
        server.log()
    );
    assert!(
        after <= before + MEMORY_GROWTH_BOUND,
        "resident memory grew from {:.1} MiB to {:.1} MiB{}",
        mib(before),
        mib(after),
        server.log()
    );
    assert_survived(&mut server, &bystanders).await;
}

/// Bytes in MiB, for messages.
pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// FNV-1a, to give each method its own stream of cases.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
