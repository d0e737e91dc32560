#[tether_macros::interface]
trait Calculator {
    async fn divide(&self, a: f64, b: f64) -> f64;
}

fn main() {}
