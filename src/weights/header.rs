//! The safetensors framing: an 8-byte little-endian header length, then a
//! JSON header describing every tensor's dtype, shape and byte range. Both
//! pushes and disk updates read it through here, so a malformed length or
//! header is refused the same way, before any tensor data is read.

use super::WeightsError;
use candle_core::DType;

/// Largest accepted JSON header (the safetensors format's own limit).
pub const MAX_HEADER: usize = 100_000_000;

/// The smallest JSON object, `{}`.
const MIN_HEADER: usize = 2;

/// Bytes of the length prefix.
pub const PREFIX: usize = 8;

/// One tensor as the header describes it.
#[derive(Debug, Clone)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub begin: usize,
    pub end: usize,
}

fn bad(message: String) -> WeightsError {
    WeightsError::Format(format!(
        "the body is not a valid safetensors file: {message}"
    ))
}

/// The JSON header's length from the 8-byte prefix. A length of 0 or 1 can
/// hold no JSON object, and anything past [`MAX_HEADER`] is refused before a
/// byte of it is buffered.
pub fn header_length(prefix: [u8; PREFIX]) -> Result<usize, WeightsError> {
    let n = u64::from_le_bytes(prefix);
    if n < MIN_HEADER as u64 {
        return Err(bad(format!(
            "its header length is {n} (the first 8 bytes must give the size of a JSON header, at least {MIN_HEADER})"
        )));
    }
    if n > MAX_HEADER as u64 {
        return Err(bad(format!(
            "its header length is {n}, over the {MAX_HEADER}-byte limit"
        )));
    }
    Ok(n as usize)
}

/// Collects a safetensors body's length prefix and JSON header as the body
/// arrives, frame by frame (pushes of the weights and of adapters).
#[derive(Debug, Default)]
pub struct HeaderReader {
    prefix: Vec<u8>,
    len: Option<usize>,
    json: Vec<u8>,
}

impl HeaderReader {
    /// Takes what of `chunk` belongs to the header, advancing it past
    /// that; the JSON header once it is all in.
    pub fn take(&mut self, chunk: &mut &[u8]) -> Result<Option<&[u8]>, WeightsError> {
        let len = match self.len {
            Some(len) => len,
            None => {
                let n = (PREFIX - self.prefix.len()).min(chunk.len());
                self.prefix.extend_from_slice(&chunk[..n]);
                *chunk = &chunk[n..];
                let Ok(prefix) = <[u8; PREFIX]>::try_from(self.prefix.as_slice()) else {
                    return Ok(None);
                };
                let len = header_length(prefix)?;
                self.len = Some(len);
                len
            }
        };
        // Grown as bytes arrive: a large claimed length costs nothing until
        // the bytes are really sent.
        let n = (len - self.json.len()).min(chunk.len());
        self.json.extend_from_slice(&chunk[..n]);
        *chunk = &chunk[n..];
        Ok((self.json.len() == len).then_some(self.json.as_slice()))
    }

    /// Whether the whole length prefix is in.
    pub fn has_length(&self) -> bool {
        self.len.is_some()
    }

    /// Bytes of the prefix and the header read so far.
    pub fn header_bytes(&self) -> usize {
        self.prefix.len() + self.json.len()
    }
}

fn dtype_of(name: &str, tag: &str) -> Result<DType, WeightsError> {
    match tag {
        "F32" => Ok(DType::F32),
        "F16" => Ok(DType::F16),
        "BF16" => Ok(DType::BF16),
        "F64" => Ok(DType::F64),
        other => Err(WeightsError::UnsupportedDtype {
            name: name.to_string(),
            dtype: other.to_string(),
        }),
    }
}

/// Parses and checks a safetensors JSON header: entries sorted by offset,
/// contiguous from 0, each exactly `numel * dtype size` bytes.
pub fn parse_header(json: &[u8]) -> Result<Vec<HeaderEntry>, WeightsError> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| bad(format!("its header is not a JSON object: {e}")))?;
    let mut entries = Vec::with_capacity(map.len());
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| info.get(k).ok_or_else(|| bad(format!("{name}: no `{k}`")));
        let dtype = dtype_of(&name, field("dtype")?.as_str().unwrap_or_default())?;
        let nums = |k: &str| -> Result<Vec<usize>, WeightsError> {
            field(k)?
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
                        .collect()
                })
                .ok_or_else(|| bad(format!("{name}: `{k}` must be a list of integers")))
        };
        let shape = nums("shape")?;
        let offsets = nums("data_offsets")?;
        let [begin, end] = offsets[..] else {
            return Err(bad(format!("{name}: `data_offsets` must have two entries")));
        };
        // Checked: a hostile shape must not wrap around to a small size.
        let expected = shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("{name}: shape {shape:?} overflows")))?;
        if end < begin || end - begin != expected {
            return Err(bad(format!(
                "{name}: {} data bytes for shape {shape:?}",
                end.saturating_sub(begin)
            )));
        }
        entries.push(HeaderEntry {
            name,
            dtype,
            shape,
            begin,
            end,
        });
    }
    entries.sort_by_key(|e| e.begin);
    let mut at = 0;
    for e in &entries {
        if e.begin != at {
            return Err(bad(format!(
                "{}: data does not follow the previous tensor",
                e.name
            )));
        }
        at = e.end;
    }
    Ok(entries)
}

/// Bytes of data after the header: where the last tensor ends.
pub fn data_len(entries: &[HeaderEntry]) -> usize {
    entries.last().map_or(0, |e| e.end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_that_cannot_hold_a_header_are_refused() {
        for n in [0u64, 1, MAX_HEADER as u64 + 1, u64::MAX] {
            let e = header_length(n.to_le_bytes()).unwrap_err().to_string();
            assert!(e.contains(&format!("header length is {n}")), "{e}");
        }
        assert_eq!(header_length(2u64.to_le_bytes()).unwrap(), 2);
    }

    #[test]
    fn a_shape_that_overflows_is_refused() {
        let json = br#"{"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}}"#;
        let e = parse_header(json).unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
    }
}
