//! GRUB's environment block (`grub-editenv` format), holding one variable: `acl_set`.
//!
//! The block is 1024 bytes: the header line, `name=value` lines, then `#` to the end. GRUB's
//! `load_env` reads it, and its `save_env` rewrites it in place, which is why the size never
//! changes. Ours holds only `acl_set=a` or `acl_set=b`, in the first 512 bytes: the switch
//! rewrites one sector, which a disk writes whole or not at all.

use crate::Set;

/// The block's size.
pub const BLOCK: usize = 1024;
/// Its first line.
pub const HEADER: &str = "# GRUB Environment Block\n";
/// The variable that names the set.
pub const VAR: &str = "acl_set";

/// The block naming `set`.
pub fn render(set: Set) -> [u8; BLOCK] {
    let mut block = [b'#'; BLOCK];
    let text = format!("{HEADER}{VAR}={set}\n");
    block[..text.len()].copy_from_slice(text.as_bytes());
    block
}

/// The set a block names, or why it names none. Only a block exactly as [`render`] writes it
/// counts: GRUB reads other blocks too (any size, comments, the last of several values), and
/// a block read differently here than by GRUB could make an update write GRUB's first choice;
/// any other block is rewritten before an update.
pub fn parse(block: &[u8]) -> Result<Set, String> {
    let set = parse_loose(block)?;
    if block != render(set) {
        return Err(format!("{VAR}={set}, but not in the one form written here"));
    }
    Ok(set)
}

/// The value of the first `acl_set` line of a 1024-byte block.
fn parse_loose(block: &[u8]) -> Result<Set, String> {
    if block.len() != BLOCK {
        return Err(format!("{} bytes, not {BLOCK}", block.len()));
    }
    let Some(body) = block.strip_prefix(HEADER.as_bytes()) else {
        return Err("no GRUB environment block header".into());
    };
    // Variables end where the padding starts; GRUB reads lines up to it.
    let end = body.iter().position(|&b| b == b'#').unwrap_or(body.len());
    let text = std::str::from_utf8(&body[..end]).map_err(|_| "not text".to_owned())?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(VAR)?.strip_prefix('='))
        .ok_or_else(|| format!("no {VAR}"))?;
    Set::from_name(value).ok_or_else(|| format!("{VAR}={value:?} names no set"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_names_its_set_and_fits_one_sector() {
        for s in Set::BOTH {
            let b = render(s);
            assert_eq!(parse(&b), Ok(s));
            // Everything that differs between the two blocks is in the first sector.
            assert!(b[512..].iter().all(|&c| c == b'#'));
        }
        assert_ne!(render(Set::A)[..512], render(Set::B)[..512]);
    }

    #[test]
    fn damaged_blocks_name_nothing() {
        let mut b = render(Set::A);
        b[0] = b'x';
        assert!(parse(&b).is_err());
        assert!(parse(&render(Set::A)[..512]).is_err());
        let mut c = render(Set::B);
        c[HEADER.len() + VAR.len() + 1] = b'z';
        assert_eq!(parse(&c), Err("acl_set=\"z\" names no set".into()));
        assert!(parse(&[b'#'; BLOCK]).is_err());
        // Two values (GRUB takes the last), or anything after the padding: not ours.
        let mut two = render(Set::A);
        let extra = format!("{HEADER}{VAR}=a\n{VAR}=b\n");
        two[..extra.len()].copy_from_slice(extra.as_bytes());
        assert!(parse(&two).is_err());
        let mut tail = render(Set::B);
        tail[1000] = b'x';
        assert!(parse(&tail).is_err());
        // Any single byte changed in the first sector gives a set or an error, never a panic.
        for i in 0..512 {
            for v in [0u8, b'\n', b'=', 0xff] {
                let mut d = render(Set::B);
                d[i] = v;
                let _ = parse(&d);
            }
        }
    }
}
