//! Whether a kernel image carries an Authenticode signature: the PE header's certificate
//! table is not empty. Not a verification (shim verifies against its keys); it lets
//! `aclctl first-stage install` refuse, before writing, a kernel that shim would certainly
//! refuse under Secure Boot.

/// `Some(true)` if the PE image in `head` (its first bytes, 4 KiB is enough) has a certificate
/// table, `Some(false)` if it has none, `None` if `head` is not a PE image.
pub fn signed(head: &[u8]) -> Option<bool> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(head.get(at..at.checked_add(2)?)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(head.get(at..at.checked_add(4)?)?.try_into().ok()?));
    if head.get(..2)? != b"MZ" {
        return None;
    }
    let pe = usize::try_from(u32_at(0x3c)?).ok()?;
    if head.get(pe..pe.checked_add(4)?)? != b"PE\0\0" {
        return None;
    }
    let optional = pe + 24;
    // The data directories follow the optional header's fixed part: 96 bytes in PE32, 112 in
    // PE32+. The certificate table is directory 4; its size is the second word.
    let dirs = match u16_at(optional)? {
        0x10b => optional + 96,
        0x20b => optional + 112,
        _ => return None,
    };
    let count = u32_at(dirs - 4)?;
    if count <= 4 {
        return Some(false);
    }
    Some(u32_at(dirs + 4 * 8 + 4)? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pe(magic: u16, cert_size: u32) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[..2].copy_from_slice(b"MZ");
        b[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        let opt = 0x80 + 24;
        b[opt..opt + 2].copy_from_slice(&magic.to_le_bytes());
        let dirs = opt + if magic == 0x20b { 112 } else { 96 };
        b[dirs - 4..dirs].copy_from_slice(&16u32.to_le_bytes());
        b[dirs + 36..dirs + 40].copy_from_slice(&cert_size.to_le_bytes());
        b
    }

    #[test]
    fn the_certificate_table_decides() {
        assert_eq!(signed(&pe(0x20b, 0x1000)), Some(true));
        assert_eq!(signed(&pe(0x20b, 0)), Some(false));
        assert_eq!(signed(&pe(0x10b, 8)), Some(true));
        assert_eq!(signed(b"not a kernel"), None);
        assert_eq!(signed(&[]), None);
        // Cut anywhere: an answer or None, never a panic.
        let full = pe(0x20b, 0x1000);
        for n in 0..full.len() {
            let _ = signed(&full[..n]);
        }
        let mut far = full.clone();
        far[0x3c..0x40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(signed(&far), None);
    }
}
