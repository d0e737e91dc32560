#[tether_macros::interface]
trait Service {
    #[tether(renamed = "sayHi")]
    async fn say_hi(&self, name: String) -> Result<String, tether::RemoteError>;
}

fn main() {}
