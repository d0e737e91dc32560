#[tether_macros::interface]
trait Chat {
    #[tether(emit)]
    fn message(&self, text: String);
}

fn main() {}
