//! NumPy `.npy` vectors, for exchanging updates with Python tools
//! (`agentmesh aggregate`, the Flower comparison).
//!
//! Reads version 1–3 files holding a C-order array of little-endian `f32` or
//! `f64` (any shape; the values are flattened), and writes `f32` arrays.

/// Largest `.npy` payload read, in elements (as for models).
pub const MAX_NPY_ELEMENTS: usize = crate::model::MAX_PARAMS;

/// Largest `.npy` header accepted, in bytes.
const MAX_HEADER: usize = 64 * 1024;

/// Why a `.npy` file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NpyError {
    /// Not a `.npy` file or a malformed header.
    #[error("not a valid .npy file: {reason}")]
    Format {
        /// What is wrong.
        reason: String,
    },
    /// A dtype, order or layout this reader does not handle.
    #[error("unsupported .npy array: {reason}")]
    Unsupported {
        /// What is not supported.
        reason: String,
    },
    /// More elements than [`MAX_NPY_ELEMENTS`].
    #[error("{elements} elements is more than the limit of {MAX_NPY_ELEMENTS}")]
    TooLarge {
        /// Elements the header declares.
        elements: u128,
    },
    /// A value is NaN or infinite, or an `f64` outside the `f32` range.
    #[error("element {index} is not a finite f32")]
    NotFinite {
        /// Its position.
        index: usize,
    },
}

fn format_err(reason: impl Into<String>) -> NpyError {
    NpyError::Format {
        reason: reason.into(),
    }
}

/// Parses a `.npy` file into its shape and values (as `f32`).
pub fn read_npy(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), NpyError> {
    let magic = bytes.get(..6).ok_or_else(|| format_err("too short"))?;
    if magic != b"\x93NUMPY" {
        return Err(format_err("bad magic"));
    }
    let major = *bytes.get(6).ok_or_else(|| format_err("too short"))?;
    let (header_len, start) = match major {
        1 => {
            let b = bytes.get(8..10).ok_or_else(|| format_err("too short"))?;
            (usize::from(u16::from_le_bytes([b[0], b[1]])), 10)
        }
        2 | 3 => {
            let b = bytes.get(8..12).ok_or_else(|| format_err("too short"))?;
            let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            (len, 12)
        }
        v => {
            return Err(NpyError::Unsupported {
                reason: format!("format version {v}"),
            })
        }
    };
    if header_len > MAX_HEADER {
        return Err(format_err("header too large"));
    }
    let header = bytes
        .get(start..start + header_len)
        .ok_or_else(|| format_err("header runs past the end"))?;
    let header = std::str::from_utf8(header).map_err(|_| format_err("header is not UTF-8"))?;
    let descr = dict_value(header, "descr")?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let width = match descr {
        "<f4" => 4,
        "<f8" => 8,
        other => {
            return Err(NpyError::Unsupported {
                reason: format!("dtype {other:?} (need '<f4' or '<f8')"),
            })
        }
    };
    if dict_value(header, "fortran_order")?.trim() != "False" {
        return Err(NpyError::Unsupported {
            reason: "Fortran order".to_string(),
        });
    }
    let shape_text = dict_value(header, "shape")?;
    let inner = shape_text
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format_err("shape is not a tuple"))?;
    let mut shape = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        shape.push(
            part.parse::<usize>()
                .map_err(|_| format_err(format!("bad dimension {part:?}")))?,
        );
    }
    let elements = shape
        .iter()
        .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128))
        .unwrap_or(u128::MAX);
    if elements > MAX_NPY_ELEMENTS as u128 {
        return Err(NpyError::TooLarge { elements });
    }
    let elements = elements as usize;
    let data = &bytes[start + header_len..];
    if data.len() != elements * width {
        return Err(format_err(format!(
            "{} data bytes for {elements} elements of {width} bytes",
            data.len()
        )));
    }
    let mut values = Vec::with_capacity(elements);
    for (index, chunk) in data.chunks_exact(width).enumerate() {
        let v = if width == 4 {
            f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])
        } else {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            f64::from_le_bytes(b) as f32
        };
        if !v.is_finite() {
            return Err(NpyError::NotFinite { index });
        }
        values.push(v);
    }
    Ok((shape, values))
}

/// The text after `'key':` in a header dict, up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Result<&'a str, NpyError> {
    let needle = format!("'{key}':");
    let at = header
        .find(&needle)
        .ok_or_else(|| format_err(format!("header has no {key:?}")))?;
    let rest = &header[at + needle.len()..];
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Ok(&rest[..i]),
            _ => {}
        }
    }
    Err(format_err(format!("unterminated {key:?}")))
}

/// Encodes `values` as a C-order little-endian `f32` `.npy` array of `shape`
/// (whose product must be `values.len()`; a mismatch writes a 1-D array).
pub fn write_npy(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let shape: Vec<usize> = if shape.iter().product::<usize>() == values.len() {
        shape.to_vec()
    } else {
        vec![values.len()]
    };
    let dims = match shape.as_slice() {
        [one] => format!("({one},)"),
        many => format!(
            "({})",
            many.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Pad so the data starts on a 64-byte boundary, ending in a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + values.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() -> Result<(), NpyError> {
        let v = vec![1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0];
        let bytes = write_npy(&[2, 3], &v);
        assert_eq!((bytes.len() - v.len() * 4) % 64, 0);
        assert_eq!(read_npy(&bytes)?, (vec![2, 3], v.clone()));
        assert_eq!(read_npy(&write_npy(&[6], &v))?, (vec![6], v));
        Ok(())
    }

    #[test]
    fn reads_numpy_f64_and_rejects_junk() {
        // What np.save writes for np.array([1.0, 2.0]) (float64).
        let mut header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }".to_string();
        header.push_str(&" ".repeat(117 - header.len()));
        header.push('\n');
        let mut f = b"\x93NUMPY\x01\x00".to_vec();
        f.extend((header.len() as u16).to_le_bytes());
        f.extend(header.as_bytes());
        f.extend(1.0f64.to_le_bytes());
        f.extend(2.0f64.to_le_bytes());
        assert_eq!(read_npy(&f), Ok((vec![2], vec![1.0, 2.0])));
        assert!(matches!(read_npy(b"junk"), Err(NpyError::Format { .. })));
        let mut nan = write_npy(&[1], &[0.0]);
        let end = nan.len();
        nan[end - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(read_npy(&nan), Err(NpyError::NotFinite { index: 0 }));
    }
}
