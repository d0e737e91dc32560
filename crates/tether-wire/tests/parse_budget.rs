//! The parser's heap stays proportional to its input (issue 17): measured with a counting
//! global allocator, so these are real allocation figures, not estimates.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use tether_wire::parse::{budget_for, parse, ParseErrorKind, AMPLIFICATION, BUDGET_FLOOR};

/// Counts live and peak heap bytes of the whole process.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // As the system allocator does it: glibc moves a large block with mremap, without a
        // second copy, so only the size change is counted.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grown = new_size - layout.size();
                let now = LIVE.fetch_add(grown, Ordering::SeqCst) + grown;
                PEAK.fetch_max(now, Ordering::SeqCst);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
            }
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Tests in this binary run on several threads and the counts are process-wide: each test
/// holds this for its whole body, so nothing else allocates while it measures.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Parses `text` and returns (result, peak heap above what was live before, heap still held
/// by the value).
fn measured(
    text: &str,
) -> (
    Result<tether_wire::Value, tether_wire::ParseError>,
    usize,
    usize,
) {
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let result = parse(text);
    let peak = PEAK.load(Ordering::SeqCst) - before;
    let held = LIVE.load(Ordering::SeqCst).saturating_sub(before);
    (result, peak, held)
}

/// The stated peak while parsing: the budget plus the string literal being decoded (at most
/// the text).
fn bound(text: &str) -> usize {
    budget_for(text.len()) + text.len()
}

fn holes(n: usize) -> String {
    let mut s = String::with_capacity(n + 2);
    s.push('[');
    s.extend(std::iter::repeat_n(',', n));
    s.push(']');
    s
}

#[test]
fn an_8_mib_array_of_holes_is_refused_within_the_budget() {
    let _one = serial();
    let text = holes(8 << 20);
    let (result, peak, held) = measured(&text);
    let err = result.unwrap_err();
    assert_eq!(
        err.kind,
        ParseErrorKind::OverBudget {
            budget: budget_for(text.len())
        }
    );
    assert!(peak <= bound(&text), "peak {peak} > {}", bound(&text));
    // A refused parse holds nothing but its error's text.
    assert!(held < 256, "held {held}");
    // One flat array never reserves past the budget. Before the budget, the same message
    // cost 32× its text (256 MiB).
    assert!(peak <= budget_for(text.len()) + 256, "peak {peak}");
}

#[test]
fn accepted_values_stay_under_the_bound() {
    let _one = serial();
    let mut cases = vec![
        holes(BUDGET_FLOOR / 64),
        format!("[{}]", "'abcdefgh-ijklmnop',".repeat(50_000)),
        format!(
            "{{{}}}",
            (0..5_000)
                .map(|i| format!("property_{i}:'a longer value, as a real one would be {i}',"))
                .collect::<String>()
        ),
        format!(
            "[{}]",
            "[0.25,'a string in a pair, long enough'],".repeat(20_000)
        ),
        format!("'{}'", "x\\n".repeat(100_000)),
        "{ok:[1,2,'three',{a:[]}]}".to_owned(),
    ];
    cases.push(format!(
        "{{call:[7,'app'],method:[{}]}}",
        "1.5,".repeat(1000)
    ));
    for text in &cases {
        let (result, peak, held) = measured(text);
        let value = result.unwrap_or_else(|e| panic!("{e} for {}", &text[..40.min(text.len())]));
        assert!(
            peak <= bound(text),
            "peak {peak} > {} for {:.40}",
            bound(text),
            text
        );
        assert!(
            held <= budget_for(text.len()),
            "held {held} for {:.40}",
            text
        );
        drop(value);
    }
}

#[test]
fn dense_numbers_past_the_floor_are_refused_not_built() {
    let _one = serial();
    // 2 bytes of text, 32 bytes of value each: 16×, past AMPLIFICATION once the floor is used.
    let text = format!("[{}]", "1,".repeat(1 << 20));
    let (result, peak, _) = measured(&text);
    assert!(matches!(
        result.unwrap_err().kind,
        ParseErrorKind::OverBudget { .. }
    ));
    assert!(peak <= bound(&text));
    const { assert!(AMPLIFICATION <= 4) };
}

#[test]
fn a_budget_error_names_the_offset_where_it_ran_out() {
    let _one = serial();
    let text = holes(1 << 20);
    let err = parse(&text).unwrap_err();
    assert!(err.offset > 0 && err.offset < text.len(), "{err}");
    assert!(err.to_string().contains("bytes"), "{err}");
}
