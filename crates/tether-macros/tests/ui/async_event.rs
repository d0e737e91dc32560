#[tether_macros::interface]
trait Chat {
    #[tether(event)]
    async fn typing(&self, who: String);
}

fn main() {}
