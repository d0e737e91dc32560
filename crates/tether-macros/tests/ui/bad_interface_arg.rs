#[tether_macros::interface(iface = "calculator")]
trait Calculator {
    async fn answer(&self) -> Result<u8, tether::RemoteError>;
}

fn main() {}
