//! Content detectors and mask styles: pure functions over byte strings.
//!
//! Detectors find sensitive values *inside* a text value (a card number in a free-text note, an
//! e-mail in `row_to_json(c)`): payment cards (13–19 digits, single spaces or dashes between
//! digits, Luhn check), e-mail addresses, US SSNs and ITINs (`AAA-GG-SSSS`, any number of that shape), IBANs
//! (ISO 13616 mod-97 checksum, optional spaces), phone numbers (E.164 `+…` or North-American
//! formats with separators) and user regexes. Values are scanned as bytes (no UTF-8
//! requirement). Cheap prefilters skip values that cannot hold a hit (no `@`, too few digits).

use std::ops::Range;

use sha2::{Digest, Sha256};

/// A built-in content detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Detector {
    Card,
    Email,
    Ssn,
    Iban,
    Phone,
}

impl Detector {
    pub fn as_str(self) -> &'static str {
        match self {
            Detector::Card => "card",
            Detector::Email => "email",
            Detector::Ssn => "ssn",
            Detector::Iban => "iban",
            Detector::Phone => "phone",
        }
    }
}

/// How a value (or a detected part of one) is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Every letter and digit, and every non-ASCII character, becomes `*` (ASCII separators
    /// such as `-`, `@`, `.` and spaces stay).
    Full,
    /// Like `Full`, but the last N letters/digits stay. For an e-mail address: the first
    /// character of the local part and the whole domain stay (`j***@example.com`).
    KeepLast(usize),
    /// `h:` + 16 hex digits of HMAC-SHA256(key, value): stable across sessions and tables, so
    /// masked values can still be joined and counted.
    Hash,
    /// SQL NULL (for a hit inside a larger text: the whole value becomes NULL).
    Null,
}

impl Style {
    pub fn name(self) -> &'static str {
        match self {
            Style::Full => "full",
            Style::KeepLast(_) => "keep_last",
            Style::Hash => "hash",
            Style::Null => "null",
        }
    }
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for i in 0..64 {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let inner = Sha256::new().chain_update(ipad).chain_update(msg).finalize();
    let outer = Sha256::new().chain_update(opad).chain_update(inner).finalize();
    let mut out = [0u8; 32];
    out.copy_from_slice(&outer);
    out
}

/// The replacement for `v` under `style`; None means SQL NULL.
pub fn apply_style(style: Style, v: &[u8], key: &[u8]) -> Option<Vec<u8>> {
    match style {
        Style::Null => None,
        Style::Hash => {
            let mac = hmac_sha256(key, v);
            let mut out = b"h:".to_vec();
            out.extend_from_slice(hex::encode(&mac[..8]).as_bytes());
            Some(out)
        }
        Style::Full => {
            let mut out = Vec::with_capacity(v.len());
            for (u, hide) in units(v) {
                if hide {
                    out.push(b'*');
                } else {
                    out.extend_from_slice(&v[u]);
                }
            }
            Some(out)
        }
        Style::KeepLast(n) => {
            if let Some(at) = email_at(v) {
                let mut out = Vec::with_capacity(v.len());
                if at > 0 {
                    out.push(v[0]);
                }
                out.extend_from_slice(b"***");
                out.extend_from_slice(&v[at..]);
                return Some(out);
            }
            let total = units(v).filter(|(_, hide)| *hide).count();
            let hide = total.saturating_sub(n);
            let mut seen = 0;
            let mut out = Vec::with_capacity(v.len());
            for (u, hideable) in units(v) {
                if hideable {
                    seen += 1;
                }
                if hideable && seen <= hide {
                    out.push(b'*');
                } else {
                    out.extend_from_slice(&v[u]);
                }
            }
            Some(out)
        }
    }
}

/// The pieces of `v` the `full` and `keep_last` styles walk, each with whether it is one the
/// styles hide: an ASCII letter or digit (hidden), another ASCII byte (a separator, kept),
/// or a non-ASCII character — a byte of 0x80 or more with the UTF-8 continuation bytes after
/// it — which is hidden whatever it is: a letter of another script, a full-width digit or a
/// byte of another encoding carries the value as much as `a` or `4` does.
fn units(v: &[u8]) -> impl Iterator<Item = (Range<usize>, bool)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let &b = v.get(i)?;
        let start = i;
        i += 1;
        if b < 0x80 {
            return Some((start..i, is_alnum(b)));
        }
        while v.get(i).is_some_and(|c| (0x80..0xC0).contains(c)) {
            i += 1;
        }
        Some((start..i, true))
    })
}

/// `v` is exactly one e-mail address: the position of its `@`.
fn email_at(v: &[u8]) -> Option<usize> {
    let at = v.iter().position(|&b| b == b'@')?;
    let m = find_emails(v);
    (m.len() == 1 && m[0] == (0..v.len())).then_some(at)
}

// ------------------------------------------------------------------------------- detectors

/// Luhn check over ASCII digits.
pub fn luhn_ok(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut x = (d - b'0') as u32;
        if i % 2 == 1 {
            x *= 2;
            if x > 9 {
                x -= 9;
            }
        }
        sum += x;
    }
    sum % 10 == 0
}

/// Runs of digits where single spaces or dashes may separate digits: (range, digits).
fn digit_runs(v: &[u8]) -> Vec<(Range<usize>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        if !v[i].is_ascii_digit() || (i > 0 && v[i - 1].is_ascii_digit()) {
            i += 1;
            continue;
        }
        let start = i;
        let mut digits = vec![v[i]];
        let mut end = i + 1;
        let mut j = i + 1;
        while j < v.len() {
            if v[j].is_ascii_digit() {
                digits.push(v[j]);
                j += 1;
                end = j;
            } else if (v[j] == b' ' || v[j] == b'-') && j + 1 < v.len() && v[j + 1].is_ascii_digit() {
                j += 1;
            } else {
                break;
            }
        }
        i = end;
        // A run glued to letters (`x4242…`, from `'x' || card`) still counts.
        out.push((start..end, digits));
    }
    out
}

pub fn find_cards(v: &[u8]) -> Vec<Range<usize>> {
    digit_runs(v)
        .into_iter()
        .filter(|(_, d)| (13..=19).contains(&d.len()) && luhn_ok(d))
        .map(|(r, _)| r)
        .collect()
}

fn email_local(b: u8) -> bool {
    is_alnum(b) || b".!#$%&'*+/=?^_`{|}~-".contains(&b)
}

fn email_domain(b: u8) -> bool {
    is_alnum(b) || b == b'-' || b == b'.'
}

pub fn find_emails(v: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(p) = v[from..].iter().position(|&b| b == b'@') {
        let at = from + p;
        from = at + 1;
        let mut s = at;
        while s > 0 && email_local(v[s - 1]) {
            s -= 1;
        }
        let mut e = at + 1;
        while e < v.len() && email_domain(v[e]) {
            e += 1;
        }
        // trim trailing dots/dashes from the domain
        while e > at + 1 && (v[e - 1] == b'.' || v[e - 1] == b'-') {
            e -= 1;
        }
        let domain = &v[at + 1..e];
        let labels: Vec<&[u8]> = domain.split(|&b| b == b'.').collect();
        let ok = s < at
            && labels.len() >= 2
            && labels.iter().all(|l| !l.is_empty())
            && labels.last().is_some_and(|t| t.len() >= 2 && t.iter().all(|b| b.is_ascii_alphabetic()));
        if ok {
            if out.last().is_some_and(|r: &Range<usize>| r.end > s) {
                continue;
            }
            out.push(s..e);
            from = e;
        }
    }
    out
}

/// `AAA-GG-SSSS` (or with spaces): every number of that shape, issued or not. Area numbers
/// the SSA never assigns (000, 666, 9xx) are ITINs, test data or typos of real numbers, and a
/// person reading one would still call it an SSN.
pub fn find_ssns(v: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    if v.len() < 11 {
        return out;
    }
    let mut i = 0;
    while i + 11 <= v.len() {
        let w = &v[i..i + 11];
        let sep = w[3];
        let shape = (sep == b'-' || sep == b' ')
            && w.iter().enumerate().all(|(k, &b)| if k == 3 || k == 6 { b == sep } else { b.is_ascii_digit() });
        let before = i == 0 || !(is_alnum(v[i - 1]) || v[i - 1] == b'-');
        let after = i + 11 == v.len() || !(is_alnum(v[i + 11]) || v[i + 11] == b'-');
        if shape && before && after {
            out.push(i..i + 11);
            i += 11;
            continue;
        }
        i += 1;
    }
    out
}

/// ISO 13616: move the first four characters to the end, letters to 10..35, mod 97 == 1.
pub fn iban_ok(chars: &[u8]) -> bool {
    if chars.len() < 15 || chars.len() > 34 {
        return false;
    }
    let rearranged = chars[4..].iter().chain(&chars[..4]);
    let mut rem: u32 = 0;
    for &c in rearranged {
        let v = match c {
            b'0'..=b'9' => (c - b'0') as u32,
            b'A'..=b'Z' => (c - b'A') as u32 + 10,
            _ => return false,
        };
        rem = if v >= 10 { (rem * 100 + v) % 97 } else { (rem * 10 + v) % 97 };
    }
    rem == 1
}

pub fn find_ibans(v: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 15 <= v.len() {
        let start_ok = (i == 0 || !is_alnum(v[i - 1]))
            && v[i].is_ascii_uppercase()
            && v[i + 1].is_ascii_uppercase()
            && v[i + 2].is_ascii_digit()
            && v[i + 3].is_ascii_digit();
        if !start_ok {
            i += 1;
            continue;
        }
        // Collect uppercase alphanumerics, allowing single spaces between groups.
        let mut chars = Vec::new();
        let mut j = i;
        let mut end = i;
        while j < v.len() && chars.len() < 34 {
            let b = v[j];
            if b.is_ascii_digit() || b.is_ascii_uppercase() {
                chars.push(b);
                j += 1;
                end = j;
            } else if b == b' ' && j + 1 < v.len() && (v[j + 1].is_ascii_digit() || v[j + 1].is_ascii_uppercase()) {
                j += 1;
            } else {
                break;
            }
        }
        // Try the longest candidate first, then shorter ones (a trailing word may be glued on
        // by a space).
        let mut found = None;
        let mut k = chars.len();
        while k >= 15 {
            if iban_ok(&chars[..k]) {
                found = Some(k);
                break;
            }
            k -= 1;
        }
        match found {
            Some(k) => {
                // map k chars back to a byte end
                let mut n = 0;
                let mut e = i;
                while e < end && n < k {
                    if v[e] != b' ' {
                        n += 1;
                    }
                    e += 1;
                }
                if e == v.len() || !is_alnum(v[e]) {
                    out.push(i..e);
                    i = e;
                    continue;
                }
                i += 1;
            }
            None => i += 1,
        }
    }
    out
}

pub fn find_phones(v: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let b = v[i];
        let boundary = i == 0 || !(is_alnum(v[i - 1]) || v[i - 1] == b'-' || v[i - 1] == b'+');
        if !boundary || !(b == b'+' || b == b'(' || b.is_ascii_digit()) {
            i += 1;
            continue;
        }
        // Scan a run of digits with separators ( ) space . -
        let plus = b == b'+';
        let mut j = if plus { i + 1 } else { i };
        let mut digits = 0;
        let mut seps = 0;
        let mut end = i;
        let mut groups = 0;
        let mut in_group = false;
        while j < v.len() {
            let c = v[j];
            if c.is_ascii_digit() {
                digits += 1;
                if !in_group {
                    groups += 1;
                    in_group = true;
                }
                j += 1;
                end = j;
            } else if matches!(c, b' ' | b'.' | b'-' | b'(' | b')') && digits < 15 {
                if c != b'(' && c != b')' {
                    seps += 1;
                }
                in_group = false;
                j += 1;
                if c == b')' {
                    end = j;
                }
            } else {
                break;
            }
        }
        let after_ok = end == v.len() || !is_alnum(v[end]);
        let ok = if plus {
            (8..=15).contains(&digits)
        } else {
            // North-American: 10 digits (or 11 with a leading 1) in 3+ groups, e.g.
            // (555) 123-4567, 555-123-4567, 555.123.4567, 1 555 123 4567.
            (digits == 10 || (digits == 11 && b == b'1')) && groups >= 3 && seps >= 1
        };
        if ok && after_ok && end > i {
            out.push(i..end);
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Compiled content detection: built-ins plus user regexes.
#[derive(Debug, Clone, Default)]
pub struct Detectors {
    pub builtin: Vec<Detector>,
    pub regexes: Vec<regex::bytes::Regex>,
}

impl Detectors {
    pub fn is_empty(&self) -> bool {
        self.builtin.is_empty() && self.regexes.is_empty()
    }

    /// Every hit in `v`, sorted, non-overlapping (earlier/longer wins).
    pub fn find(&self, v: &[u8]) -> Vec<Range<usize>> {
        let mut hits: Vec<Range<usize>> = Vec::new();
        if v.is_empty() {
            return hits;
        }
        let ndigits = v.iter().filter(|b| b.is_ascii_digit()).count();
        let has_at = v.contains(&b'@');
        for d in &self.builtin {
            match d {
                Detector::Card if ndigits >= 13 => hits.extend(find_cards(v)),
                Detector::Email if has_at => hits.extend(find_emails(v)),
                Detector::Ssn if ndigits >= 9 => hits.extend(find_ssns(v)),
                Detector::Iban if ndigits >= 2 && v.len() >= 15 => hits.extend(find_ibans(v)),
                Detector::Phone if ndigits >= 8 => hits.extend(find_phones(v)),
                _ => {}
            }
        }
        for r in &self.regexes {
            hits.extend(r.find_iter(v).filter(|m| !m.is_empty()).map(|m| m.range()));
        }
        if hits.len() > 1 {
            hits.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
            let mut merged: Vec<Range<usize>> = Vec::with_capacity(hits.len());
            for h in hits {
                match merged.last_mut() {
                    Some(last) if h.start < last.end => last.end = last.end.max(h.end),
                    _ => merged.push(h),
                }
            }
            hits = merged;
        }
        hits
    }
}

/// Replace every hit of `det` in `v` under `style`. None: no hit (value unchanged).
/// Some(None): the value becomes NULL. Some(Some(bytes)): the new value.
pub fn mask_content(det: &Detectors, style: Style, v: &[u8], key: &[u8]) -> Option<(Option<Vec<u8>>, usize)> {
    let hits = det.find(v);
    if hits.is_empty() {
        return None;
    }
    if style == Style::Null {
        return Some((None, hits.len()));
    }
    let mut out = Vec::with_capacity(v.len() + 8);
    let mut pos = 0;
    for h in &hits {
        out.extend_from_slice(&v[pos..h.start]);
        if let Some(r) = apply_style(style, &v[h.clone()], key) {
            out.extend_from_slice(&r);
        }
        pos = h.end;
    }
    out.extend_from_slice(&v[pos..]);
    Some((Some(out), hits.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[u8]) -> String {
        String::from_utf8_lossy(v).into_owned()
    }

    #[test]
    fn styles() {
        let key = b"k";
        let cases: &[(Style, &str, Option<&str>)] = &[
            (Style::Full, "4242-4242-4242-4242", Some("****-****-****-****")),
            (Style::KeepLast(4), "4242-4242-4242-4242", Some("****-****-****-4242")),
            (Style::KeepLast(4), "4242424242424242", Some("************4242")),
            (Style::KeepLast(4), "john@example.com", Some("j***@example.com")),
            (Style::KeepLast(4), "abc", Some("abc")),
            (Style::KeepLast(0), "abc", Some("***")),
            (Style::Full, "jo@ex.com", Some("**@**.***")),
            (Style::Null, "x", None),
            // Non-ASCII characters are hidden one `*` each, whatever their script.
            (Style::Full, "Иван Петров", Some("**** ******")),
            (Style::Full, "\u{ff14}\u{ff12}\u{ff14}\u{ff12}", Some("****")),
            (Style::KeepLast(2), "José-Ⅻ", Some("***é-Ⅻ")),
            (Style::KeepLast(4), "иван@пример.рф", Some("****@****ер.рф")),
        ];
        for (style, input, want) in cases {
            let got = apply_style(*style, input.as_bytes(), key).map(|v| s(&v));
            assert_eq!(got.as_deref(), *want, "{style:?} {input}");
        }
        let h1 = apply_style(Style::Hash, b"a@b.com", key).unwrap();
        let h2 = apply_style(Style::Hash, b"a@b.com", key).unwrap();
        let h3 = apply_style(Style::Hash, b"a@b.com", b"other").unwrap();
        assert_eq!(h1, h2);
        assert_ne!(h1, h3);
        assert_eq!(h1.len(), 18);
        assert!(s(&h1).starts_with("h:"));
    }

    #[test]
    fn hmac_known_answer() {
        // RFC 4231 test case 2
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    fn found(f: fn(&[u8]) -> Vec<Range<usize>>, v: &str) -> Vec<String> {
        f(v.as_bytes()).into_iter().map(|r| v[r].to_string()).collect()
    }

    #[test]
    fn cards() {
        let table: &[(&str, &[&str])] = &[
            ("4242424242424242", &["4242424242424242"]),
            ("card 4242 4242 4242 4242 paid", &["4242 4242 4242 4242"]),
            ("4242-4242-4242-4242", &["4242-4242-4242-4242"]),
            ("5555555555554444,378282246310005", &["5555555555554444", "378282246310005"]),
            ("4242424242424241", &[]),       // Luhn fails
            ("424242424242", &[]),           // too short
            ("42424242424242424242424", &[]), // too long
            ("4242--4242-4242-4242", &[]),    // double separator breaks the run
            ("x4242424242424242", &["4242424242424242"]),
        ];
        for (v, want) in table {
            assert_eq!(found(find_cards, v), want.to_vec(), "{v}");
        }
    }

    #[test]
    fn emails() {
        let table: &[(&str, &[&str])] = &[
            ("john@example.com", &["john@example.com"]),
            ("mail: a.b+c@mail.example.org.", &["a.b+c@mail.example.org"]),
            ("{\"email\":\"x@y.io\"}", &["x@y.io"]),
            ("not@an", &[]),
            ("@example.com", &[]),
            ("a@b.c1", &[]),
            ("two a@b.com, c@d.net", &["a@b.com", "c@d.net"]),
        ];
        for (v, want) in table {
            assert_eq!(found(find_emails, v), want.to_vec(), "{v}");
        }
    }

    #[test]
    fn ssns() {
        let table: &[(&str, &[&str])] = &[
            ("123-45-6789", &["123-45-6789"]),
            ("ssn 078-05-1120.", &["078-05-1120"]),
            ("000-12-3456", &["000-12-3456"]),
            ("666-12-3456", &["666-12-3456"]),
            ("912-12-3456", &["912-12-3456"]),
            ("123-00-4567", &["123-00-4567"]),
            ("ssn: 987 65 4321", &["987 65 4321"]),
            ("123-45 6789", &[]),
            ("1123-45-6789", &[]),
            ("123-45-67890", &[]),
            ("2024-01-15", &[]),
        ];
        for (v, want) in table {
            assert_eq!(found(find_ssns, v), want.to_vec(), "{v}");
        }
    }

    #[test]
    fn ibans() {
        let table: &[(&str, &[&str])] = &[
            ("GB82WEST12345698765432", &["GB82WEST12345698765432"]),
            ("iban GB82 WEST 1234 5698 7654 32 ok", &["GB82 WEST 1234 5698 7654 32"]),
            ("DE89370400440532013000", &["DE89370400440532013000"]),
            ("GB83WEST12345698765432", &[]), // checksum
            ("XX", &[]),
        ];
        for (v, want) in table {
            assert_eq!(found(find_ibans, v), want.to_vec(), "{v}");
        }
        assert!(iban_ok(b"DE89370400440532013000"));
        assert!(!iban_ok(b"DE88370400440532013000"));
    }

    #[test]
    fn phones() {
        let table: &[(&str, &[&str])] = &[
            ("+14155552671", &["+14155552671"]),
            ("call +44 20 7946 0958 now", &["+44 20 7946 0958"]),
            ("(555) 123-4567", &["(555) 123-4567"]),
            ("555-123-4567", &["555-123-4567"]),
            ("555.123.4567", &["555.123.4567"]),
            ("5551234567", &[]),       // no separators: too ambiguous
            ("2024-01-15", &[]),
            ("123-45-6789", &[]),      // SSN shape, 9 digits
            ("id 12345", &[]),
        ];
        for (v, want) in table {
            assert_eq!(found(find_phones, v), want.to_vec(), "{v}");
        }
    }

    #[test]
    fn content_masking() {
        let det = Detectors {
            builtin: vec![Detector::Card, Detector::Email],
            regexes: vec![regex::bytes::Regex::new(r"EMP-\d{6}").unwrap()],
        };
        let v = b"{\"card\":\"4242424242424242\",\"email\":\"john@example.com\",\"id\":\"EMP-123456\"}";
        let (out, n) = mask_content(&det, Style::KeepLast(4), v, b"k").unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            s(&out.unwrap()),
            "{\"card\":\"************4242\",\"email\":\"j***@example.com\",\"id\":\"***-**3456\"}"
        );
        assert!(mask_content(&det, Style::Full, b"nothing here 12", b"k").is_none());
        let (out, _) = mask_content(&det, Style::Null, b"x 4242424242424242", b"k").unwrap();
        assert!(out.is_none());
    }
}
