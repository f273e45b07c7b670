//! CPython's line tables: which source line an instruction is on.

/// 3.10's `co_linetable` (PEP 626, Objects/lnotab_notes.txt): pairs of
/// (bytecode-offset delta: u8, line delta: i8), where a line delta of -128
/// means "no line" and the line does not change. `addr` is in bytes.
/// Mirrors CPython's `advance()`/`_PyCode_CheckLineNumber`.
pub(super) fn line_310(table: &[u8], first_line: i32, addr: i64) -> Option<i64> {
    let mut line = i64::from(first_line);
    let mut end: i64 = 0;
    for pair in table.chunks_exact(2) {
        let start = end;
        end += i64::from(pair[0]);
        let delta = pair[1] as i8;
        let this = if delta == -128 {
            None
        } else {
            line += i64::from(delta);
            Some(line)
        };
        if start <= addr && addr < end {
            return this;
        }
    }
    None
}

/// Reads a varint of the 3.11+ location table at `*pos`: 6-bit chunks,
/// least significant first, bit 6 set on all but the last.
fn varint(table: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    let mut shift = 0u32;
    loop {
        let b = *table.get(*pos)?;
        *pos += 1;
        value |= u64::from(b & 63).checked_shl(shift)?;
        if b & 64 == 0 {
            return Some(value);
        }
        shift += 6;
        if shift > 42 {
            return None;
        }
    }
}

fn svarint(table: &[u8], pos: &mut usize) -> Option<i64> {
    let v = varint(table, pos)?;
    let magnitude = i64::try_from(v >> 1).ok()?;
    Some(if v & 1 == 1 { -magnitude } else { magnitude })
}

/// 3.11+'s location table (Objects/locations.md): entries starting with a
/// byte `1cccclll` (code `cccc`, covering `lll + 1` code units) followed by
/// code-specific bytes that never have bit 7 set. Only the line is
/// decoded: codes 0-9 keep it, 10-12 add `code - 10`, 13 and 14 start with
/// a signed varint delta, 15 means "no location". `index` is in code
/// units. Mirrors CPython's `advance()`/`get_line_delta()`.
pub(super) fn line_311(table: &[u8], first_line: i32, index: i64) -> Option<i64> {
    let mut line = i64::from(first_line);
    let mut end: i64 = 0;
    let mut pos = 0;
    while let Some(&head) = table.get(pos) {
        if head & 0x80 == 0 {
            return None; // not at an entry start: a corrupt table
        }
        let code = (head >> 3) & 15;
        let start = end;
        end += i64::from(head & 7) + 1;
        let delta = match code {
            10..=12 => i64::from(code - 10),
            13 | 14 => {
                let mut p = pos + 1;
                svarint(table, &mut p)?
            }
            _ => 0,
        };
        line = line.checked_add(delta)?;
        if start <= index && index < end {
            return (code != 15).then_some(line);
        }
        pos += 1;
        while table.get(pos).is_some_and(|b| b & 0x80 == 0) {
            pos += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoders_survive_garbage() {
        // A small xorshift: deterministic, no dependency.
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..2000 {
            let len = (next() % 64) as usize;
            let table: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let at = (next() % 200) as i64 - 10;
            let _ = line_310(&table, i32::MAX, at);
            let _ = line_311(&table, i32::MIN, at);
            let _ = line_311(&table, 1, i64::MAX);
        }
        // Varints that never end, or overflow.
        assert_eq!(line_311(&[0xe8, 0x7f, 0x7f], 1, 0), None);
        assert_eq!(line_311(&[0xe8; 1], 1, 0), None);
    }

    #[test]
    fn line_311_forms() {
        // RESUME-like no-column entry at +0, one-line form +1, long form
        // -1, "no location" and a short form.
        let table = [
            0x80 | (13 << 3),     // no columns, 1 unit
            0x00,                 // delta 0
            0x80 | (11 << 3) | 1, // one line form: +1, 2 units
            0x05,
            0x06,
            0x80 | (14 << 3), // long form, 1 unit
            0x03,             // svarint -1
            0x00,
            0x01,
            0x02,
            0x80 | (15 << 3),    // no location, 1 unit
            0x80 | (2 << 3) | 2, // short form, same line, 3 units
            0x11,
        ];
        let lines: Vec<Option<i64>> = (0..9).map(|i| line_311(&table, 10, i)).collect();
        assert_eq!(
            lines,
            [
                Some(10),
                Some(11),
                Some(11),
                Some(10),
                None,
                Some(10),
                Some(10),
                Some(10),
                None
            ]
        );
    }
}
