//! FP8 e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities, NaN = 0x7f/0xff,
//! largest finite value 448), the element type of block-scaled FP8 checkpoints.

use std::sync::OnceLock;

fn decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// All 256 codes as f32.
pub fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| decode(i as u8)))
}

/// Largest finite e4m3fn value.
pub const E4M3_MAX: f32 = 448.0;

/// Rounds to the nearest e4m3fn code (ties to even), saturating at ±448.
pub fn encode_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    let table = e4m3_table();
    // Codes 0..=126 are the non-negative finite values in increasing order.
    let (mut lo, mut hi) = (0usize, 126usize);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if table[mid] <= a {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (dl, dh) = (a - table[lo], table[hi] - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) { lo } else { hi };
    sign | code as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_code_round_trips() {
        for code in 0u8..=255 {
            let v = e4m3_table()[code as usize];
            if v.is_nan() {
                continue;
            }
            let back = encode_e4m3(v);
            // +0 and -0 are both exact; everything else must map to itself.
            assert_eq!(e4m3_table()[back as usize], v, "code {code:#x}");
        }
        assert_eq!(e4m3_table()[0x7e], 448.0);
        assert_eq!(e4m3_table()[0x01], 2f32.powi(-9));
    }

    #[test]
    fn rounds_to_nearest_and_saturates() {
        assert_eq!(e4m3_table()[encode_e4m3(1000.0) as usize], 448.0);
        assert_eq!(e4m3_table()[encode_e4m3(-1000.0) as usize], -448.0);
        // 1.0625 lies halfway between 1.0 (even mantissa) and 1.125: ties go to even.
        assert_eq!(e4m3_table()[encode_e4m3(1.0625) as usize], 1.0);
        assert_eq!(e4m3_table()[encode_e4m3(1.07) as usize], 1.125);
    }
}
