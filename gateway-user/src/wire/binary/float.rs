//! `float4` / `float8` as Postgres prints them by default (`extra_float_digits` 1): the
//! shortest digits that read back as the same value, in fixed notation when the decimal
//! exponent is from -4 up to below the type's digit count (6 for float4, 15 for float8), in
//! `1.5e+20` notation (at least two exponent digits) otherwise; `NaN`, `Infinity`,
//! `-Infinity`, `-0`.

/// Postgres's fixed-notation limits (`FLT_DIG`, `DBL_DIG`): a decimal exponent at or above
/// these is written in scientific notation.
const FLOAT4_FIXED_BELOW: i32 = 6;
const FLOAT8_FIXED_BELOW: i32 = 15;
/// A decimal exponent below this is written in scientific notation.
const FIXED_FROM: i32 = -4;

pub(super) fn float4_text(v: f32) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    // `{:e}` writes the shortest round-trip digits of the f32 itself.
    shortest(v.is_infinite(), v.is_sign_negative(), &format!("{:e}", v.abs()), FLOAT4_FIXED_BELOW)
}

pub(super) fn float8_text(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    shortest(v.is_infinite(), v.is_sign_negative(), &format!("{:e}", v.abs()), FLOAT8_FIXED_BELOW)
}

/// `sci` is Rust's shortest scientific form of the magnitude (`1.5e20`, `1e-5`, `0e0`).
fn shortest(infinite: bool, negative: bool, sci: &str, fixed_below: i32) -> String {
    let sign = if negative { "-" } else { "" };
    if infinite {
        return format!("{sign}Infinity");
    }
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if digits == "0" {
        return format!("{sign}0");
    }
    if (FIXED_FROM..fixed_below).contains(&exp) {
        return format!("{sign}{}", fixed(&digits, exp));
    }
    let (first, rest) = digits.split_at(1);
    let point = if rest.is_empty() { "" } else { "." };
    let esign = if exp < 0 { '-' } else { '+' };
    format!("{sign}{first}{point}{rest}e{esign}{:02}", exp.unsigned_abs())
}

/// `digits` (d.ddd × 10^exp) in fixed notation, without trailing zeros after the point.
fn fixed(digits: &str, exp: i32) -> String {
    if exp < 0 {
        return format!("0.{}{digits}", "0".repeat((-exp - 1) as usize));
    }
    let int_len = exp as usize + 1;
    if digits.len() <= int_len {
        format!("{digits}{}", "0".repeat(int_len - digits.len()))
    } else {
        format!("{}.{}", &digits[..int_len], &digits[int_len..])
    }
}
