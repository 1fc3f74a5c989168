//! Splitting coordinate ranges across threads with `std::thread::scope`.

use std::ops::Range;

/// Below this many coordinates a second thread costs more than it saves.
const MIN_COORDS_PER_THREAD: usize = 1 << 15;

/// How many threads to use for `len` coordinates.
pub(crate) fn threads_for(len: usize) -> usize {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    available.min(len / MIN_COORDS_PER_THREAD).max(1)
}

/// `len` split into `parts` contiguous ranges whose boundaries are multiples of
/// `align` (except the end).
pub(crate) fn ranges(len: usize, parts: usize, align: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    let align = align.max(1);
    let step = len.div_ceil(parts).div_ceil(align) * align;
    (0..parts)
        .map(|p| (p * step).min(len)..((p + 1) * step).min(len))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Runs `work` on each range (one thread per range beyond the first, which
/// runs on the caller's thread) and returns the results in range order.
pub(crate) fn map_ranges<R: Send>(
    len: usize,
    align: usize,
    work: impl Fn(Range<usize>) -> R + Sync,
) -> Vec<R> {
    let parts = ranges(len, threads_for(len), align);
    if parts.len() <= 1 {
        return vec![work(0..len)];
    }
    std::thread::scope(|s| {
        let work = &work;
        let handles: Vec<_> = parts[1..]
            .iter()
            .cloned()
            .map(|r| s.spawn(move || work(r)))
            .collect();
        let mut out = vec![work(parts[0].clone())];
        for h in handles {
            match h.join() {
                Ok(r) => out.push(r),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// Fills `out` in parallel: `work(start, chunk)` gets a chunk of `out` and the
/// index of its first element; chunk starts are multiples of `align`.
pub(crate) fn fill_chunks<T: Send>(
    out: &mut [T],
    align: usize,
    work: impl Fn(usize, &mut [T]) + Sync,
) {
    let parts = ranges(out.len(), threads_for(out.len()), align);
    if parts.len() <= 1 {
        work(0, out);
        return;
    }
    std::thread::scope(|s| {
        let work = &work;
        let mut rest = out;
        let mut chunks = Vec::with_capacity(parts.len());
        for r in &parts {
            let (head, tail) = rest.split_at_mut(r.len());
            chunks.push((r.start, head));
            rest = tail;
        }
        let mut iter = chunks.into_iter();
        let first = iter.next();
        for (start, chunk) in iter {
            s.spawn(move || work(start, chunk));
        }
        if let Some((start, chunk)) = first {
            work(start, chunk);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_exactly() {
        for len in [0, 1, 7, 100, 1001] {
            for parts in 1..5 {
                for align in [1, 8, 64] {
                    let rs = ranges(len, parts, align);
                    let mut next = 0;
                    for r in &rs {
                        assert_eq!(r.start, next);
                        assert!(r.start % align == 0);
                        next = r.end;
                    }
                    assert_eq!(next, len);
                }
            }
        }
    }
}
