//! Seeded random and mutated input for everything in `wire` that reads bytes a peer chose:
//! frame splitting, every message decoder, the startup packet and binary-format values.
//! None of them may panic or loop: a peer's bytes are answered with an error (FATAL 08P01
//! for the session) or, for a binary value, with None. Deterministic (fixed seeds), so a
//! failure names the seed and case that reproduce it.

use bytes::{BufMut, BytesMut};

use super::binary::to_text;
use super::*;

/// Cases per target; every case is a fresh input.
const CASES: usize = 20_000;

/// xorshift64*: small, fast and reproducible; quality is not the point.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        // Bytes that mean something in the formats read here come up often.
        const INTERESTING: [u8; 8] = [0, 0xff, 0x7f, 0x80, 1, 4, b'\\', 0xc0];
        if self.below(4) == 0 { INTERESTING[self.below(INTERESTING.len())] } else { self.next() as u8 }
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.byte()).collect()
    }
    /// A big-endian i32 that is often a boundary value.
    fn i32(&mut self) -> i32 {
        const EDGES: [i32; 9] = [0, 1, -1, 2, 4, 6, 7, i32::MAX, i32::MIN];
        if self.below(2) == 0 { EDGES[self.below(EDGES.len())] } else { self.next() as i32 }
    }
}

/// `valid` with a few random edits: byte flips, a cut, an inserted run, a 4-byte field set
/// to a boundary value.
fn mutate(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    let mut v = valid.to_vec();
    for _ in 0..=rng.below(3) {
        match rng.below(4) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.byte();
            }
            1 if !v.is_empty() => v.truncate(rng.below(v.len())),
            2 => {
                let at = rng.below(v.len() + 1);
                let ins = rng.bytes(8);
                v.splice(at..at, ins);
            }
            _ if v.len() >= 4 => {
                let at = rng.below(v.len() - 3);
                v[at..at + 4].copy_from_slice(&rng.i32().to_be_bytes());
            }
            _ => v.push(rng.byte()),
        }
    }
    v
}

fn frame_of(tag: u8, body: &[u8]) -> Frame {
    let mut b = BytesMut::new();
    message(&mut b, tag, body);
    match split_frame(&mut b, usize::MAX) {
        Ok(Some(f)) => f,
        other => panic!("a frame built by `message` did not split: {other:?}"),
    }
}

/// Well-formed bodies of the client messages pgward decodes, to mutate from.
fn client_bodies() -> Vec<(u8, Vec<u8>)> {
    let mut parse = BytesMut::new();
    parse.put_slice(b"s1\0select $1::int, $2\0");
    parse.put_i16(2);
    parse.put_u32(23);
    parse.put_u32(25);
    let mut bind = BytesMut::new();
    bind.put_slice(b"p1\0s1\0");
    bind.put_i16(2);
    bind.put_i16(1);
    bind.put_i16(0);
    bind.put_i16(2);
    bind.put_i32(4);
    bind.put_i32(7);
    bind.put_i32(-1);
    bind.put_i16(1);
    bind.put_i16(1);
    let mut call = BytesMut::new();
    call.put_i32(1598);
    call.put_i16(1);
    call.put_i16(1);
    call.put_i16(1);
    call.put_i32(4);
    call.put_i32(42);
    call.put_i16(1);
    let mut execute = BytesMut::new();
    execute.put_slice(b"p1\0");
    execute.put_i32(100);
    vec![
        (b'Q', b"select 1; select 'a'\0".to_vec()),
        (b'P', parse.to_vec()),
        (b'B', bind.to_vec()),
        (b'E', execute.to_vec()),
        (b'D', b"Sstmt\0".to_vec()),
        (b'C', b"Pportal\0".to_vec()),
        (b'F', call.to_vec()),
        (b'p', b"eyJhbGciOiJFUzI1NiJ9.e30.sig\0".to_vec()),
    ]
}

/// Well-formed bodies of the server messages pgward decodes.
fn server_bodies() -> Vec<(u8, Vec<u8>)> {
    let mut rowdesc = BytesMut::new();
    rowdesc.put_i16(2);
    for (name, oid) in [(&b"id\0"[..], 23u32), (b"card\0", 25)] {
        rowdesc.put_slice(name);
        rowdesc.put_u32(16_384);
        rowdesc.put_i16(1);
        rowdesc.put_u32(oid);
        rowdesc.put_i16(4);
        rowdesc.put_i32(-1);
        rowdesc.put_i16(0);
    }
    let mut pdesc = BytesMut::new();
    pdesc.put_i16(2);
    pdesc.put_u32(23);
    pdesc.put_u32(25);
    let mut copyout = BytesMut::new();
    copyout.put_u8(0);
    copyout.put_i16(2);
    copyout.put_i16(0);
    copyout.put_i16(0);
    vec![
        (b'T', rowdesc.to_vec()),
        (b't', pdesc.to_vec()),
        (b'C', b"INSERT 0 5\0".to_vec()),
        (b'E', b"SERROR\0C42501\0Mdenied\0\0".to_vec()),
        (b'S', b"client_encoding\0UTF8\0".to_vec()),
        (b'H', copyout.to_vec()),
    ]
}

/// Every decoder on one frame; results are thrown away, only a panic fails.
fn decode_all(f: &Frame) {
    for enc in [ClientEncoding::Utf8, ClientEncoding::Latin1] {
        let _ = decode_query(f, enc);
        let _ = decode_parse(f, enc);
        let _ = decode_parse_typed(f, enc);
    }
    let _ = decode_bind(f);
    let _ = decode_execute(f);
    let _ = decode_close_or_describe(f);
    let _ = decode_function_call(f);
    let _ = decode_password(f);
    let _ = decode_parameter_description(f);
    let _ = decode_command_complete(f);
    let _ = decode_error(f);
    let _ = decode_row_description(f);
    let _ = decode_copy_out_response(f);
    let _ = decode_parameter_status(f);
}

#[test]
fn message_decoders_never_panic_on_random_or_mutated_bodies() {
    let seeds: Vec<(u8, Vec<u8>)> = client_bodies().into_iter().chain(server_bodies()).collect();
    let mut rng = Rng::new(0x5eed_0001);
    for case in 0..CASES {
        let (tag, body) = if case % 3 == 0 {
            (rng.byte(), rng.bytes(48))
        } else {
            let (tag, valid) = &seeds[rng.below(seeds.len())];
            (*tag, mutate(&mut rng, valid))
        };
        let f = frame_of(tag, &body);
        let run = std::panic::catch_unwind(|| decode_all(&f));
        assert!(run.is_ok(), "case {case}: a decoder panicked on tag {:?} body {body:?}", char::from(tag));
    }
}

#[test]
fn frame_splitting_never_panics_and_takes_only_whole_frames() {
    let mut rng = Rng::new(0x5eed_0002);
    for case in 0..CASES {
        let mut valid = BytesMut::new();
        for (tag, body) in client_bodies().into_iter().take(1 + rng.below(3)) {
            message(&mut valid, tag, &body);
        }
        let input = if case % 2 == 0 { mutate(&mut rng, &valid) } else { rng.bytes(64) };
        let peeked: usize = complete_frames(&input).map(|(_, raw)| raw.len()).sum();
        assert!(peeked <= input.len(), "case {case}: peeked past the input");
        let mut buf = BytesMut::from(&input[..]);
        let mut taken = 0;
        let max = [MAX_FRAME, 64, 8][rng.below(3)];
        // Each round takes a frame, stops at an incomplete one, or rejects a bad length.
        for _ in 0..=input.len() {
            match split_frame(&mut buf, max) {
                Ok(Some(f)) => {
                    assert!(f.raw.len() >= 5 && f.raw.len() <= max + 1, "case {case}: frame of {} bytes", f.raw.len());
                    taken += f.raw.len();
                }
                Ok(None) | Err(_) => break,
            }
        }
        assert_eq!(taken + buf.len(), input.len(), "case {case}: bytes lost or invented");
    }
}

#[test]
fn startup_parser_never_panics_on_random_or_mutated_packets() {
    let mut valid = BytesMut::new();
    startup_packet(&mut valid, &[("user", "alice"), ("database", "app"), ("options", "-c x=1")]);
    let mut cancel = BytesMut::new();
    cancel_request(&mut cancel, 4242, 77);
    let mut rng = Rng::new(0x5eed_0003);
    for case in 0..CASES {
        let input = match case % 3 {
            0 => rng.bytes(64),
            1 => mutate(&mut rng, &valid),
            _ => mutate(&mut rng, &cancel),
        };
        let run = std::panic::catch_unwind(|| parse_startup(&input));
        assert!(run.is_ok(), "case {case}: parse_startup panicked on {input:?}");
    }
}

/// A well-formed one-dimensional binary array of `n` elements of type `elem`, each `elem_bytes`.
fn binary_array(elem: u32, elem_bytes: &[u8], n: i32) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i32(1);
    b.put_i32(0);
    b.put_u32(elem);
    b.put_i32(n);
    b.put_i32(1);
    for _ in 0..n {
        b.put_i32(elem_bytes.len() as i32);
        b.put_slice(elem_bytes);
    }
    b.to_vec()
}

#[test]
fn binary_values_never_panic_on_random_or_mutated_bytes() {
    // Every type to_text prints (scalars, then arrays: element OID known from the scalar),
    // with a well-formed value of each to mutate from.
    let numeric = [0u8, 2, 0, 0, 0, 0, 0, 2, 0, 12, 13, 0x80];
    let scalars: Vec<(u32, Vec<u8>)> = vec![
        (16, vec![1]),
        (17, b"\x00\xffab".to_vec()),
        (19, b"name".to_vec()),
        (20, 7i64.to_be_bytes().to_vec()),
        (21, 7i16.to_be_bytes().to_vec()),
        (23, 7i32.to_be_bytes().to_vec()),
        (25, b"text".to_vec()),
        (26, 7u32.to_be_bytes().to_vec()),
        (114, b"{\"a\":1}".to_vec()),
        (700, 1.5f32.to_be_bytes().to_vec()),
        (701, 1.5f64.to_be_bytes().to_vec()),
        (1042, b"bp".to_vec()),
        (1043, b"vc".to_vec()),
        (1082, 9000i32.to_be_bytes().to_vec()),
        (1083, 3_600_000_000i64.to_be_bytes().to_vec()),
        (1114, 1_000_000_000_000i64.to_be_bytes().to_vec()),
        (1184, (-1_000_000_000_000i64).to_be_bytes().to_vec()),
        (1186, [0u8, 0, 0, 0, 0, 0x0f, 0x42, 0x40, 0, 0, 0, 2, 0, 0, 0, 1].to_vec()),
        (1700, numeric.to_vec()),
        (2950, (0u8..16).collect()),
        (3802, b"\x01{}".to_vec()),
    ];
    let arrays: [(u32, u32); 6] = [(1007, 23), (1009, 25), (1231, 1700), (1185, 1184), (1187, 1186), (2951, 2950)];
    let mut seeds: Vec<(u32, Vec<u8>)> = scalars.clone();
    for (array, elem) in arrays {
        if let Some((_, v)) = scalars.iter().find(|(o, _)| *o == elem) {
            seeds.push((array, binary_array(elem, v, 3)));
        }
    }
    let mut rng = Rng::new(0x5eed_0004);
    for case in 0..CASES {
        let (oid, valid) = &seeds[rng.below(seeds.len())];
        let input = if case % 4 == 0 { rng.bytes(40) } else { mutate(&mut rng, valid) };
        let run = std::panic::catch_unwind(|| to_text(*oid, &input));
        assert!(run.is_ok(), "case {case}: to_text({oid}) panicked on {input:?}");
    }
    // The seeds themselves are values to_text prints: the mutations start from real input.
    for (oid, valid) in &seeds {
        assert!(to_text(*oid, valid).is_some(), "seed of type {oid} is not a value to_text reads: {valid:?}");
    }
}
