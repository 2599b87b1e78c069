//! Text key=value data (RFC 7143 §6.1): `key=value` strings, each ended by a NUL.
//!
//! Used by Login and Text PDUs. Keys are at most 63 bytes of letters, digits and `.-+@_`;
//! values at most 8192 bytes (the largest any key allows). Values are UTF-8 here; anything else
//! is a format error answered as the caller sees fit (login: initiator error).

use bytes::Bytes;

/// Longest key (RFC 7143 §6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value accepted for any key.
pub const MAX_VALUE_LEN: usize = 8192;

/// One key and its value, in order of appearance.
pub type Pair = (String, String);

/// Why text data could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// A key longer than 63 bytes or with characters outside the allowed set.
    #[error("invalid key {0:?}")]
    InvalidKey(String),
    /// A string without `=`.
    #[error("missing '=' in {0:?}")]
    MissingEquals(String),
    /// Not UTF-8.
    #[error("text is not UTF-8")]
    NotUtf8,
    /// A value longer than 8192 bytes.
    #[error("value of {0} too long")]
    ValueTooLong(String),
}

fn key_ok(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_KEY_LEN
        && k.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-+@_".contains(&c))
}

/// Parse text data into pairs. Empty strings (runs of NULs, padding) are skipped.
pub fn parse(data: &[u8]) -> Result<Vec<Pair>, TextError> {
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
        let Some((k, v)) = s.split_once('=') else {
            return Err(TextError::MissingEquals(s.chars().take(64).collect()));
        };
        if !key_ok(k) {
            return Err(TextError::InvalidKey(k.chars().take(64).collect()));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(TextError::ValueTooLong(k.to_string()));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encode pairs as `key=value\0...`.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Bytes {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out.into()
}

/// Parse a numerical value: decimal, or hexadecimal with `0x`/`0X` (RFC 7143 §6.1).
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 16 {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    } else {
        if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()
    }
}

/// Decode a binary value: `0x` hex or `0b` base64 (RFC 7143 §6.1, used by CHAP).
pub fn parse_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        let h = h.as_bytes();
        if h.is_empty() {
            return None;
        }
        // An odd number of digits means a leading zero nibble.
        let mut out = Vec::with_capacity(h.len().div_ceil(2));
        let mut i = 0;
        if h.len() % 2 == 1 {
            out.push(hex_digit(h[0])?);
            i = 1;
        }
        while i < h.len() {
            out.push(hex_digit(h[i])? << 4 | hex_digit(h[i + 1])?);
            i += 2;
        }
        Some(out)
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64_decode(b)
    } else {
        None
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.trim_end_matches('=').as_bytes();
    if s.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

/// Encode bytes as a `0x` hex value.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_skips_padding() {
        let p = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0").unwrap();
        assert_eq!(
            p,
            vec![
                ("InitiatorName".into(), "iqn.x".into()),
                ("SessionType".into(), "Normal".into())
            ]
        );
        assert_eq!(parse(b"A=b=c\0").unwrap(), vec![("A".into(), "b=c".into())]);
        assert_eq!(parse(b"").unwrap(), vec![]);
    }

    #[test]
    fn rejects_bad_text() {
        assert!(matches!(
            parse(b"NoEquals\0"),
            Err(TextError::MissingEquals(_))
        ));
        assert!(matches!(
            parse(b"Bad Key=1\0"),
            Err(TextError::InvalidKey(_))
        ));
        assert!(matches!(parse(b"=1\0"), Err(TextError::InvalidKey(_))));
        assert_eq!(parse(b"K=\xff\0"), Err(TextError::NotUtf8));
        let long = format!("{}=1\0", "K".repeat(64));
        assert!(matches!(
            parse(long.as_bytes()),
            Err(TextError::InvalidKey(_))
        ));
        let big = format!("K={}\0", "v".repeat(8193));
        assert!(matches!(
            parse(big.as_bytes()),
            Err(TextError::ValueTooLong(_))
        ));
    }

    #[test]
    fn encodes_pairs() {
        assert_eq!(&encode(&[("A", "1"), ("B", "x")])[..], b"A=1\0B=x\0");
    }

    #[test]
    fn numbers_decimal_and_hex() {
        assert_eq!(parse_number("8192"), Some(8192));
        assert_eq!(parse_number("0x2000"), Some(8192));
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number("12a"), None);
        assert_eq!(parse_number("99999999999999999999999"), None);
    }

    #[test]
    fn binary_values_hex_and_base64() {
        assert_eq!(parse_binary("0x0102ff"), Some(vec![1, 2, 255]));
        assert_eq!(parse_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(parse_binary("0bAQL/"), Some(vec![1, 2, 255]));
        assert_eq!(parse_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(parse_binary("0xzz"), None);
        assert_eq!(parse_binary("1234"), None);
        assert_eq!(hex(&[0, 0xab]), "0x00ab");
    }
}
