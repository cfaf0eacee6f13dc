//! Joining whole deflate streams into one gzip member.
//!
//! libdeflate compresses a buffer faster and smaller than zlib, but only
//! into a complete deflate stream: its last block carries the BFINAL bit,
//! and a reader stops there. To put such streams one after the other inside
//! one gzip member (as `sink/compress.rs` does with pigz's layout), each one
//! must lose that bit and end on a byte boundary, as a zlib full flush
//! would leave it. Deflate has no index of its blocks, so finding the final
//! block means walking every block's codes (RFC 1951, section 3.2); that
//! costs a small fraction of compressing them.
//!
//! A stream that does not walk cleanly to its last byte is left alone and
//! reported, so the caller falls back to a compressor that flushes itself.

/// Bits of the stream, least significant first, as deflate packs them.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bits<'a> {
    /// The next up to 32 bits without consuming them; past the end reads
    /// zeros (a read that needs them fails in `skip`).
    #[inline]
    fn peek(&self) -> u64 {
        let byte = self.pos >> 3;
        let mut word = [0u8; 8];
        if byte + 8 <= self.data.len() {
            word.copy_from_slice(&self.data[byte..byte + 8]);
        } else if byte < self.data.len() {
            let rest = &self.data[byte..];
            word[..rest.len()].copy_from_slice(rest);
        }
        u64::from_le_bytes(word) >> (self.pos & 7)
    }

    #[inline]
    fn skip(&mut self, n: u32) -> Option<()> {
        self.pos += n as usize;
        (self.pos <= self.data.len() * 8).then_some(())
    }

    #[inline]
    fn take(&mut self, n: u32) -> Option<u32> {
        let value = (self.peek() & ((1u64 << n) - 1)) as u32;
        self.skip(n)?;
        Some(value)
    }
}

/// Codes up to this many bits decode with one table look-up; longer ones
/// (rare: they are the least frequent symbols) bit by bit.
const TABLE_BITS: u32 = 12;

/// What a table entry says of the item that starts with its code: bits
/// 0-4, how many bits the whole item takes (the code, and for a length or
/// distance its extra bits, which the walk skips unread); bits 5-6, its
/// kind; bits 8-11, the code's own length; bits 16-24, the symbol. An
/// entry of 0: the code is longer than the table, decoded bit by bit.
const ITEM_BITS: u32 = 31;
const KIND: u32 = 3 << 5;
/// A literal byte, a distance, or a code-length symbol: nothing follows.
const PLAIN: u32 = 0;
/// A match length: a distance follows.
const LENGTH: u32 = 1 << 5;
/// The end of the block.
const END: u32 = 2 << 5;
/// Not a symbol of the alphabet: the slow path rejects it.
const INVALID: u32 = 3 << 5;

/// Where a literal's code leaves room in the table index for the whole
/// code of the item after it (a literal, a length or the end of the
/// block), make the entry skip both: one look-up for two items, which
/// shortens the walk's chain of dependent look-ups. The entry keeps
/// the first symbol and code length (what [`Huffman::decode`] reads).
fn pair_literals(table: &mut [u32], table_bits: u32) {
    let single = table.to_vec();
    for (index, entry) in table.iter_mut().enumerate() {
        if *entry == 0 || *entry & KIND != PLAIN {
            continue;
        }
        let first = (*entry >> 8) & 15;
        let second = single[index >> first];
        let second_len = (second >> 8) & 15;
        if second == 0 || second_len > table_bits - first {
            continue;
        }
        let both = first + (second & ITEM_BITS);
        // A length's distance must still fit in the same peek: 29 bits
        // for the pair, at most 28 for the distance, in at least 57.
        if matches!(second & KIND, PLAIN | END) || (second & KIND == LENGTH && both <= 29) {
            *entry = (*entry & !(ITEM_BITS | KIND)) | (second & KIND) | both;
        }
    }
}

/// Which alphabet a code is for: what kind each symbol is and how many
/// extra bits follow it.
#[derive(Clone, Copy)]
enum Alphabet {
    LiteralLength,
    Distance,
    CodeLength,
}

impl Alphabet {
    fn item(self, symbol: u16) -> (u32, u32) {
        let s = usize::from(symbol);
        match self {
            Alphabet::LiteralLength => match s {
                0..=255 => (PLAIN, 0),
                256 => (END, 0),
                257..=285 => (LENGTH, u32::from(LENGTH_EXTRA[s - 257])),
                _ => (INVALID, 0),
            },
            Alphabet::Distance => match DISTANCE_EXTRA.get(s) {
                Some(&extra) => (PLAIN, u32::from(extra)),
                None => (INVALID, 0),
            },
            Alphabet::CodeLength => (PLAIN, 0),
        }
    }
}

/// A canonical Huffman code: a table indexed by the next `table_bits`
/// bits (entries as described at [`ITEM_BITS`]); and the counts and
/// symbols in canonical order for the longer codes.
struct Huffman {
    table: Vec<u32>,
    mask: u64,
    alphabet: Alphabet,
    count: [u16; 16],
    sorted: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8], alphabet: Alphabet) -> Option<Huffman> {
        let max_len = u32::from(*lengths.iter().max()?);
        if max_len > 15 {
            return None;
        }
        let mut count = [0u16; 16];
        for &len in lengths {
            count[len as usize] += 1;
        }
        count[0] = 0;
        let mut next = [0u32; 16];
        let mut offset = [0usize; 16];
        let mut code = 0u32;
        for len in 1..16 {
            code = (code + u32::from(count[len - 1])) << 1;
            next[len] = code;
            offset[len] = offset[len - 1] + count[len - 1] as usize;
        }
        let table_bits = max_len.min(TABLE_BITS);
        let mut table = vec![0u32; 1 << table_bits];
        let mut sorted = vec![0u16; offset[15] + count[15] as usize];
        for (symbol, &len) in lengths.iter().enumerate() {
            if len == 0 {
                continue;
            }
            let len = u32::from(len);
            sorted[offset[len as usize]] = symbol as u16;
            offset[len as usize] += 1;
            let canonical = next[len as usize];
            next[len as usize] += 1;
            if canonical >= 1 << len {
                return None; // over-subscribed
            }
            if len > table_bits {
                continue;
            }
            let (kind, extra) = alphabet.item(symbol as u16);
            let entry = ((symbol as u32) << 16) | (len << 8) | kind | (len + extra);
            // The stream holds the code's bits first bit first: reversed.
            let mut index = (canonical.reverse_bits() >> (32 - len)) as usize;
            while index < table.len() {
                table[index] = entry;
                index += 1 << len;
            }
        }
        if matches!(alphabet, Alphabet::LiteralLength) {
            pair_literals(&mut table, table_bits);
        }
        Some(Huffman {
            table,
            mask: (1u64 << table_bits) - 1,
            alphabet,
            count,
            sorted,
        })
    }

    /// The table entry for the item at the start of `next` (bits as
    /// `peek` returns them), from the table or built for a longer code;
    /// `None` for bits that are no code.
    #[inline]
    fn entry(&self, next: u64) -> Option<u32> {
        let entry = self.table[(next & self.mask) as usize];
        if entry != 0 {
            return Some(entry);
        }
        self.entry_long(next)
    }

    /// Canonical decoding one bit at a time, for codes past the table.
    #[cold]
    fn entry_long(&self, next: u64) -> Option<u32> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= ((next >> (len - 1)) & 1) as i32;
            let count = i32::from(self.count[len]);
            if code - first < count {
                let symbol = *self.sorted.get((index + code - first) as usize)?;
                let (kind, extra) = self.alphabet.item(symbol);
                let len = len as u32;
                return Some((u32::from(symbol) << 16) | (len << 8) | kind | (len + extra));
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        None
    }

    /// The next symbol (its extra bits, if any, are the caller's to read).
    fn decode(&self, bits: &mut Bits) -> Option<u16> {
        let entry = self.entry(bits.peek())?;
        bits.skip((entry >> 8) & 15)?;
        Some((entry >> 16) as u16)
    }
}

const LENGTH_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DISTANCE_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// The order in which a dynamic block lists its code-length code.
const CODE_LENGTH_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

fn fixed_codes() -> Option<(Huffman, Huffman)> {
    let mut lengths = [0u8; 288];
    lengths[..144].fill(8);
    lengths[144..256].fill(9);
    lengths[256..280].fill(7);
    lengths[280..].fill(8);
    Some((
        Huffman::new(&lengths, Alphabet::LiteralLength)?,
        Huffman::new(&[5u8; 30], Alphabet::Distance)?,
    ))
}

fn dynamic_codes(bits: &mut Bits) -> Option<(Huffman, Huffman)> {
    let literals = bits.take(5)? as usize + 257;
    let distances = bits.take(5)? as usize + 1;
    let code_lengths = bits.take(4)? as usize + 4;
    if literals > 286 || distances > 30 {
        return None;
    }
    let mut order = [0u8; 19];
    for &slot in &CODE_LENGTH_ORDER[..code_lengths] {
        order[slot] = bits.take(3)? as u8;
    }
    let length_code = Huffman::new(&order, Alphabet::CodeLength)?;
    let mut lengths = [0u8; 286 + 30];
    let total = literals + distances;
    let mut i = 0;
    while i < total {
        let symbol = length_code.decode(bits)?;
        let (value, repeat) = match symbol {
            0..=15 => (symbol as u8, 1),
            16 => (*lengths.get(i.checked_sub(1)?)?, 3 + bits.take(2)? as usize),
            17 => (0, 3 + bits.take(3)? as usize),
            18 => (0, 11 + bits.take(7)? as usize),
            _ => return None,
        };
        if i + repeat > total {
            return None;
        }
        lengths[i..i + repeat].fill(value);
        i += repeat;
    }
    if lengths[256] == 0 {
        return None; // no end-of-block code
    }
    Some((
        Huffman::new(&lengths[..literals], Alphabet::LiteralLength)?,
        Huffman::new(&lengths[literals..total], Alphabet::Distance)?,
    ))
}

/// Walks one compressed block's items up to its end-of-block code,
/// skipping each whole (extra bits unread). One `peek` holds a whole
/// length/distance pair (at most 48 bits).
fn walk_codes(bits: &mut Bits, literal: &Huffman, distance: &Huffman) -> Option<()> {
    loop {
        let next = bits.peek();
        let item = literal.entry(next)?;
        let mut used = item & ITEM_BITS;
        match item & KIND {
            PLAIN => {}
            LENGTH => {
                let d = distance.entry(next >> used)?;
                if d & KIND != PLAIN {
                    return None;
                }
                used += d & ITEM_BITS;
            }
            END => return bits.skip(used),
            _ => return None,
        }
        bits.skip(used)?;
    }
}

/// The bit position of the final block's BFINAL bit, and the bit just past
/// the stream's end, if `stream` is a whole deflate stream that ends in its
/// last byte.
fn final_block(stream: &[u8]) -> Option<(usize, usize)> {
    let mut bits = Bits {
        data: stream,
        pos: 0,
    };
    let fixed = fixed_codes()?;
    loop {
        let header = bits.pos;
        let last = bits.take(1)? == 1;
        match bits.take(2)? {
            0 => {
                bits.pos = bits.pos.div_ceil(8) * 8;
                let len = bits.take(16)?;
                let nlen = bits.take(16)?;
                if len != !nlen & 0xffff {
                    return None;
                }
                bits.skip(len * 8)?;
            }
            1 => walk_codes(&mut bits, &fixed.0, &fixed.1)?,
            2 => {
                let (literal, distance) = dynamic_codes(&mut bits)?;
                walk_codes(&mut bits, &literal, &distance)?;
            }
            _ => return None,
        }
        if last {
            return (bits.pos.div_ceil(8) == stream.len()).then_some((header, bits.pos));
        }
    }
}

/// Make a whole raw deflate stream into a piece that another can follow:
/// its final block no longer final, then an empty stored block to end on a
/// byte boundary (what a zlib full flush writes). False, with `stream`
/// unchanged, if it does not walk as a whole deflate stream.
pub fn into_flushed_piece(stream: &mut Vec<u8>) -> bool {
    let Some((bfinal, end)) = final_block(stream) else {
        return false;
    };
    stream[bfinal / 8] &= !(1 << (bfinal % 8));
    // The empty stored block's header (BFINAL 0, BTYPE 00) is three zero
    // bits at `end`; then padding to the byte, LEN 0 and NLEN 0xffff.
    let header_end = end + 3;
    stream.truncate(end.div_ceil(8));
    stream.resize(header_end.div_ceil(8), 0);
    if end % 8 != 0 {
        let last = end / 8;
        stream[last] &= (1u8 << (end % 8)) - 1;
    }
    stream.extend_from_slice(&[0, 0, 0xff, 0xff]);
    true
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use std::io::{Read, Write};

    fn sample(len: usize, seed: u64) -> Vec<u8> {
        // Text-like rows with some noise, so every block type appears.
        let mut state = seed;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let word = (state >> 33) as u32;
            if word.is_multiple_of(7) {
                out.extend_from_slice(&state.to_le_bytes());
            } else {
                writeln!(out, "{{\"id\":{},\"kind\":\"k{}\"}}", word, word % 13).unwrap();
            }
        }
        out.truncate(len);
        out
    }

    /// Pieces joined as one raw deflate stream, then decoded whole.
    fn join_and_inflate(pieces: &[Vec<u8>]) -> Vec<u8> {
        let mut joined = Vec::new();
        for piece in pieces {
            joined.extend_from_slice(piece);
        }
        joined.extend_from_slice(&[0x03, 0x00]); // an empty final block
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(&joined[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn libdeflate_streams_at_every_level_join_into_one() {
        let inputs: Vec<Vec<u8>> = vec![
            sample(300_000, 1),
            Vec::new(),
            sample(1, 2),
            sample(70_000, 3),
            (0..200_000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
                .collect(),
        ];
        for level in 0..=12 {
            let mut compressor =
                libdeflater::Compressor::new(libdeflater::CompressionLvl::new(level).unwrap());
            let pieces: Vec<Vec<u8>> = inputs
                .iter()
                .map(|input| {
                    let mut out = vec![0; compressor.deflate_compress_bound(input.len())];
                    let n = compressor.deflate_compress(input, &mut out).unwrap();
                    out.truncate(n);
                    assert!(into_flushed_piece(&mut out), "level {level}");
                    out
                })
                .collect();
            assert_eq!(join_and_inflate(&pieces), inputs.concat(), "level {level}");
        }
    }

    #[test]
    fn zlib_streams_join_too() {
        let input = sample(100_000, 9);
        let mut piece = Vec::new();
        let mut encoder =
            flate2::write::DeflateEncoder::new(&mut piece, flate2::Compression::new(6));
        encoder.write_all(&input).unwrap();
        encoder.finish().unwrap();
        assert!(into_flushed_piece(&mut piece));
        let twice = [piece.clone(), piece];
        assert_eq!(join_and_inflate(&twice), [&input[..], &input[..]].concat());
    }

    #[test]
    fn a_stream_that_does_not_walk_is_left_alone() {
        let input = sample(50_000, 4);
        let mut compressor =
            libdeflater::Compressor::new(libdeflater::CompressionLvl::new(6).unwrap());
        let mut out = vec![0; compressor.deflate_compress_bound(input.len())];
        let n = compressor.deflate_compress(&input, &mut out).unwrap();
        out.truncate(n);
        // Cut short, with a byte after the end, and with a reserved block type.
        for mut damaged in [
            out[..n / 2].to_vec(),
            [&out[..], &[0u8][..]].concat(),
            vec![0x07, 0x00],
            Vec::new(),
        ] {
            let before = damaged.clone();
            assert!(!into_flushed_piece(&mut damaged));
            assert_eq!(damaged, before);
        }
    }
}
