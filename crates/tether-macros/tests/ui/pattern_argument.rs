#[tether_macros::interface]
trait Calculator {
    async fn divide(&self, (a, b): (f64, f64)) -> Result<f64, tether::RemoteError>;
}

fn main() {}
