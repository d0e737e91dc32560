#[tether_macros::interface]
trait Chat {
    #[tether(event)]
    fn typing(&self, who: String) -> bool;
}

fn main() {}
