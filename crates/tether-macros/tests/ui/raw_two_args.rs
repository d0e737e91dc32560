#[tether_macros::interface]
trait Chat {
    #[tether(raw)]
    async fn send(&self, args: Vec<tether::Value>, more: u8) -> Result<(), tether::RemoteError>;
}

fn main() {}
