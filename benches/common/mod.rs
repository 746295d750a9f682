//! Workload helpers shared by the benches: keys and value size.

/// Value size of the standard workload.
pub const VALUE_LEN: usize = 100;

/// `splitmix64`: a bijection, so distinct `i` give distinct keys.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// 16-byte key `i` (hex of a scrambled `i`); misses use `i >= 1 << 40`.
pub fn key(i: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    let v = mix(i);
    for (n, b) in out.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((v >> (60 - 4 * n)) & 0xf) as usize];
    }
    out
}
