struct Counter(i64);

impl Counter {
    #[dingo::task]
    fn add(&self, n: i64) -> i64 {
        self.0 + n
    }
}

fn main() {
    assert_eq!(Counter(1).add(2), 3);
}
