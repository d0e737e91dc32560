#[tether_macros::interface]
trait Calculator {
    const PI: f64;
    async fn answer(&self) -> Result<u8, tether::RemoteError>;
}

fn main() {}
