use bytes::{BufMut, BytesMut};

use super::*;

#[test]
fn send_now_sends_what_fits_and_never_blocks_or_signals() {
    use std::io::Read as _;
    use std::os::fd::AsFd as _;
    let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    // Far more than a socket buffer holds: part goes, the call returns instead of waiting.
    let big = vec![7u8; 16 << 20];
    let n = send_now(a.as_fd(), &big);
    assert!(n > 0 && n < big.len(), "sent {n}");
    b.set_nonblocking(true).expect("nonblocking");
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match b.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    assert_eq!(got, n, "the peer gets exactly what send_now reported");
    // A closed peer: nothing sent, no SIGPIPE (the test process would die of it).
    drop(b);
    assert_eq!(send_now(a.as_fd(), b"late"), 0);
}

fn frame(tag: u8, body: &[u8]) -> Frame {
    let mut b = BytesMut::new();
    message(&mut b, tag, body);
    split_frame(&mut b, MAX_FRAME).unwrap().unwrap()
}

#[test]
fn complete_frames_peeks_whole_frames_and_stops_at_a_partial_or_bad_one() {
    let mut b = BytesMut::new();
    query(&mut b, "select 1");
    message(&mut b, b'S', b"");
    let two = b.len();
    let cases: &[(&[u8], Vec<u8>)] = &[
        (&b[..two], vec![b'Q', b'S']),
        (&b[..two - 1], vec![b'Q']),
        (b"", vec![]),
        (b"Q\0\0", vec![]),
        (b"Q\0\0\0\x02S\0\0\0\x04", vec![]),
    ];
    for (buf, tags) in cases {
        let got: Vec<u8> = complete_frames(buf).map(|(t, _)| t).collect();
        assert_eq!(&got, tags, "{buf:?}");
    }
    let frames: Vec<&[u8]> = complete_frames(&b).map(|(_, raw)| raw).collect();
    assert_eq!(frames.concat(), b.to_vec(), "each item is the whole message, header included");
}

#[test]
fn split_waits_for_whole_frame_and_rejects_bad_lengths() {
    let mut b = BytesMut::from(&b"Q\0\0\0\x09sel"[..]);
    assert!(split_frame(&mut b, MAX_FRAME).unwrap().is_none());
    b.extend_from_slice(b"1\0");
    let f = split_frame(&mut b, MAX_FRAME).unwrap().unwrap();
    assert_eq!(decode_query(&f, ClientEncoding::Utf8).unwrap(), "sel1");
    assert!(b.is_empty());
    let mut bad = BytesMut::from(&b"Q\0\0\0\x02"[..]);
    assert!(matches!(split_frame(&mut bad, MAX_FRAME), Err(WireError::Malformed(_))));
    let mut huge = BytesMut::from(&b"Q\x7f\0\0\0"[..]);
    assert!(matches!(split_frame(&mut huge, 1 << 20), Err(WireError::Malformed(_))));
}

#[test]
fn bind_decodes_text_binary_and_null() {
    let mut body = BytesMut::new();
    body.put_slice(b"p1\0s1\0");
    body.put_i16(2);
    body.put_i16(0);
    body.put_i16(1);
    body.put_i16(3);
    body.put_i32(2);
    body.put_slice(b"42");
    body.put_i32(2);
    body.put_slice(&[0xde, 0xad]);
    // third param uses... format count 2 != 3 params: malformed
    body.put_i32(-1);
    body.put_i16(0);
    let f = frame(b'B', &body);
    assert!(decode_bind(&f).is_err());

    let mut body = BytesMut::new();
    body.put_slice(b"\0s1\0");
    body.put_i16(1);
    body.put_i16(1);
    body.put_i16(2);
    body.put_i32(2);
    body.put_slice(&[0xde, 0xad]);
    body.put_i32(-1);
    body.put_i16(0);
    let f = frame(b'B', &body);
    let b = decode_bind(&f).unwrap();
    assert_eq!(b.portal, "");
    assert_eq!(b.statement, "s1");
    let rendered: Vec<_> = b.params.iter().map(|(f, v)| render_param(*f, *v)).collect();
    assert_eq!(rendered, vec![Some("\\xdead".to_string()), None]);
}

#[test]
fn truncated_messages_are_errors_not_panics() {
    for tag in [b'P', b'B', b'E', b'C', b'F', b'Q'] {
        for body in [&b""[..], b"\0", b"a", b"a\0b", b"\0\0\xff\xff"] {
            let f = frame(tag, body);
            let _ = decode_parse(&f, ClientEncoding::Utf8);
            let _ = decode_bind(&f);
            let _ = decode_execute(&f);
            let _ = decode_close_or_describe(&f);
            let _ = decode_function_call(&f);
            let _ = decode_query(&f, ClientEncoding::Utf8);
            let _ = decode_error(&f);
        }
    }
}

#[test]
fn command_complete_rows() {
    let f = frame(b'C', b"INSERT 0 5\0");
    assert_eq!(decode_command_complete(&f).unwrap(), ("INSERT 0 5".into(), Some(5)));
    let f = frame(b'C', b"CREATE TABLE\0");
    assert_eq!(decode_command_complete(&f).unwrap(), ("CREATE TABLE".into(), None));
}

#[test]
fn startup_parses_params_and_special_requests() {
    let mut b = BytesMut::new();
    startup_packet(&mut b, &[("user", "alice"), ("database", "app")]);
    match parse_startup(&b).unwrap() {
        StartupRequest::Startup { version, params } => {
            assert_eq!(version, PROTOCOL_3_0);
            assert_eq!(params, vec![("user".into(), "alice".into()), ("database".into(), "app".into())]);
        }
        other => panic!("{other:?}"),
    }
    let mut c = BytesMut::new();
    cancel_request(&mut c, 7, -9);
    assert!(matches!(parse_startup(&c).unwrap(), StartupRequest::Cancel { pid: 7, key: -9 }));
}

#[test]
fn error_response_roundtrip() {
    let b = error_response_bytes("ERROR", "42501", "denied by rule x");
    let mut bm = BytesMut::from(&b[..]);
    let f = split_frame(&mut bm, MAX_FRAME).unwrap().unwrap();
    assert_eq!(f.tag, b'E');
    let e = decode_error(&f);
    assert_eq!((e.severity.as_str(), e.code.as_str(), e.message.as_str()), ("ERROR", "42501", "denied by rule x"));
}

#[test]
fn row_description_roundtrip() {
    let mut b = BytesMut::new();
    b.put_i16(1);
    b.put_slice(b"card\0");
    b.put_i32(16400);
    b.put_i16(3);
    b.put_i32(25);
    b.put_i16(-1);
    b.put_i32(-1);
    b.put_i16(0);
    let f = decode_row_description(&frame(b'T', &b)).unwrap();
    assert_eq!((f[0].name.as_str(), f[0].table_oid, f[0].attnum, f[0].type_oid), ("card", 16400, 3, 25));
    assert!(decode_row_description(&frame(b'T', &b[..5])).is_err());
}

#[test]
fn bind_result_formats_are_read_when_present() {
    let mut body = BytesMut::new();
    body.put_slice(b"p\0s\0");
    body.put_i16(0);
    body.put_i16(0);
    let without = frame(b'B', &body);
    assert!(decode_bind(&without).unwrap().result_formats.is_none(), "Postgres refuses it; pgward forwards it");
    body.put_i16(2);
    body.put_i16(1);
    body.put_i16(0);
    let with = frame(b'B', &body);
    assert_eq!(decode_bind(&with).unwrap().result_formats.map(|f| f.to_vec()), Some(vec![1, 0]));
}
