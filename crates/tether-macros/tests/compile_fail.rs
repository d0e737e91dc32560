//! Misuse of `#[interface]` is refused at compile time with a message that says what to write.

#[test]
fn misuse_is_refused_with_a_message() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
