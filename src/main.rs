fn main() {
    println!("wake2vec");
}
