//! `jsonb` output (`JsonbToCString` without indentation) straight from the
//! on-disk jsonb format: `{"k": v, "k2": [1, 2]}` with keys in storage order,
//! strings escaped like `escape_json`, numbers as `numeric_out`.

use super::escape::escape_json_into;
use super::number::push_numeric;

const JB_CMASK: u32 = 0x0FFF_FFFF;
const JB_FSCALAR: u32 = 0x1000_0000;
const JB_FOBJECT: u32 = 0x2000_0000;

const JENTRY_OFFLENMASK: u32 = 0x0FFF_FFFF;
const JENTRY_TYPEMASK: u32 = 0x7000_0000;
const JENTRY_HAS_OFF: u32 = 0x8000_0000;
const JENTRY_ISSTRING: u32 = 0x0000_0000;
const JENTRY_ISNUMERIC: u32 = 0x1000_0000;
const JENTRY_ISBOOL_FALSE: u32 = 0x2000_0000;
const JENTRY_ISBOOL_TRUE: u32 = 0x3000_0000;
const JENTRY_ISNULL: u32 = 0x4000_0000;
const JENTRY_ISCONTAINER: u32 = 0x5000_0000;

/// A jsonb value that does not follow the format (a corrupt datum).
#[derive(Debug, PartialEq, Eq)]
pub struct MalformedJsonb;

fn read_u32(bytes: &[u8], at: usize) -> Result<u32, MalformedJsonb> {
    let b = bytes.get(at..at + 4).ok_or(MalformedJsonb)?;
    Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn int_align(n: usize) -> usize {
    (n + 3) & !3
}

/// Append the text form of a jsonb whose varlena payload (the bytes after
/// the length header, starting with the root container) is `payload`.
pub fn push_jsonb(out: &mut Vec<u8>, payload: &[u8]) -> Result<(), MalformedJsonb> {
    push_container(out, payload, 0)
}

/// A container's entries: `JEntry`s start at 4, data after the entries.
struct Container<'a> {
    bytes: &'a [u8],
    entries: usize,
}

impl<'a> Container<'a> {
    fn jentry(&self, index: usize) -> Result<u32, MalformedJsonb> {
        read_u32(self.bytes, 4 + 4 * index)
    }

    /// Start offset of entry `index` in the data area (`getJsonbOffset`).
    fn offset(&self, index: usize) -> Result<usize, MalformedJsonb> {
        let mut offset = 0usize;
        let mut i = index;
        while i > 0 {
            i -= 1;
            let entry = self.jentry(i)?;
            offset += (entry & JENTRY_OFFLENMASK) as usize;
            if entry & JENTRY_HAS_OFF != 0 {
                break;
            }
        }
        Ok(offset)
    }

    /// (start, length, type bits) of entry `index` (`getJsonbLength`).
    fn locate(&self, index: usize) -> Result<(usize, usize, u32), MalformedJsonb> {
        let entry = self.jentry(index)?;
        let start = self.offset(index)?;
        let len = if entry & JENTRY_HAS_OFF != 0 {
            ((entry & JENTRY_OFFLENMASK) as usize)
                .checked_sub(start)
                .ok_or(MalformedJsonb)?
        } else {
            (entry & JENTRY_OFFLENMASK) as usize
        };
        Ok((start, len, entry & JENTRY_TYPEMASK))
    }

    fn data_start(&self) -> usize {
        4 + 4 * self.entries
    }

    fn push_entry(
        &self,
        out: &mut Vec<u8>,
        index: usize,
        depth: usize,
    ) -> Result<(), MalformedJsonb> {
        let (start, len, kind) = self.locate(index)?;
        let base = self.data_start();
        match kind {
            JENTRY_ISSTRING => {
                let bytes = self
                    .bytes
                    .get(base + start..base + start + len)
                    .ok_or(MalformedJsonb)?;
                escape_json_into(out, bytes);
            }
            JENTRY_ISNUMERIC => {
                // A full numeric varlena with a 4-byte header, int-aligned.
                let at = base + int_align(start);
                let end = base + start + len;
                let header = read_u32(self.bytes, at)?;
                let size = (header >> 2) as usize; // VARSIZE_4B
                let payload = self
                    .bytes
                    .get(at + 4..(at + size).min(end))
                    .ok_or(MalformedJsonb)?;
                push_numeric(out, payload);
            }
            JENTRY_ISBOOL_FALSE => out.extend_from_slice(b"false"),
            JENTRY_ISBOOL_TRUE => out.extend_from_slice(b"true"),
            JENTRY_ISNULL => out.extend_from_slice(b"null"),
            JENTRY_ISCONTAINER => {
                let at = base + int_align(start);
                let end = base + start + len;
                let bytes = self.bytes.get(at..end).ok_or(MalformedJsonb)?;
                push_container(out, bytes, depth + 1)?;
            }
            _ => return Err(MalformedJsonb),
        }
        Ok(())
    }
}

fn push_container(out: &mut Vec<u8>, bytes: &[u8], depth: usize) -> Result<(), MalformedJsonb> {
    if depth > 10_000 {
        return Err(MalformedJsonb);
    }
    let header = read_u32(bytes, 0)?;
    let count = (header & JB_CMASK) as usize;
    if header & JB_FOBJECT != 0 {
        let container = Container {
            bytes,
            entries: count.checked_mul(2).ok_or(MalformedJsonb)?,
        };
        out.push(b'{');
        for i in 0..count {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            container.push_entry(out, i, depth)?;
            out.extend_from_slice(b": ");
            container.push_entry(out, count + i, depth)?;
        }
        out.push(b'}');
    } else {
        let container = Container {
            bytes,
            entries: count,
        };
        let raw_scalar = header & JB_FSCALAR != 0;
        if !raw_scalar {
            out.push(b'[');
        }
        for i in 0..count {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            container.push_entry(out, i, depth)?;
        }
        if !raw_scalar {
            out.push(b']');
        }
    }
    Ok(())
}
