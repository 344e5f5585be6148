//! The RESP packer: calls written as RESP commands straight into one buffer, sized once, for
//! one pipelined write.

use super::Call;

/// `calls` as RESP commands written back to back into `buf`, sized once: the bytes go
/// straight from the calls to the socket, without building a `redis::Cmd` per call and
/// copying every argument twice.
pub(super) fn pack_into<'a>(buf: &mut Vec<u8>, calls: impl Iterator<Item = &'a Call> + Clone) {
    buf.reserve_exact(calls.clone().map(Call::packed_len).sum());
    for call in calls {
        call.pack_into(buf);
    }
}

/// `calls` as the bytes of one pipelined write (their replies to be read one per call).
pub(crate) fn pack(calls: &[Call]) -> Vec<u8> {
    let mut buf = Vec::new();
    pack_into(&mut buf, calls.iter());
    buf
}

impl Call {
    /// Hands each word of this command to `f`: `EVALSHA sha numkeys keys… args…` or
    /// `COMMAND keys… args…`.
    fn each_word(&self, mut f: impl FnMut(&[u8])) {
        match self.script {
            Some(script) => {
                f(b"EVALSHA");
                f(script.get_hash().as_bytes());
                f(decimal(self.keys.len(), &mut [0; 20]));
            }
            None => f(self.command.as_bytes()),
        }
        self.keys.iter().for_each(|key| f(key.as_bytes()));
        self.args.iter().for_each(|arg| f(arg));
    }

    fn words(&self) -> usize {
        let head = if self.script.is_some() { 3 } else { 1 };
        head + self.keys.len() + self.args.len()
    }

    /// Its length in RESP.
    fn packed_len(&self) -> usize {
        let mut len = 1 + decimal_len(self.words()) + 2;
        self.each_word(|word| len += 1 + decimal_len(word.len()) + 2 + word.len() + 2);
        len
    }

    /// Writes it in RESP: an array of bulk strings.
    fn pack_into(&self, buf: &mut Vec<u8>) {
        buf.push(b'*');
        push_decimal(buf, self.words());
        buf.extend_from_slice(b"\r\n");
        self.each_word(|word| push_bulk(buf, word));
    }
}

fn push_bulk(buf: &mut Vec<u8>, word: &[u8]) {
    buf.push(b'$');
    push_decimal(buf, word.len());
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(word);
    buf.extend_from_slice(b"\r\n");
}

fn decimal_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

fn push_decimal(buf: &mut Vec<u8>, n: usize) {
    buf.extend_from_slice(decimal(n, &mut [0; 20]));
}

/// `n` in decimal, written at the end of `digits`.
fn decimal(mut n: usize, digits: &mut [u8; 20]) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[at..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scripts::{PUSH, SEQ_TTL};

    /// The packing is byte for byte what redis-rs writes for the same commands.
    #[test]
    fn packed_calls_are_what_redis_rs_writes() {
        let mut numbered = Call::new(&PUSH).key("q").key("w").key("s").numbered("12".into()).arg(SEQ_TTL);
        numbered.args.extend([vec![], vec![7; 300], b"\r\n".to_vec()]);
        let calls = [numbered, Call::command("LTRIM").arg("k").arg("0").arg("0"), Call::command("EXEC")];
        let mut expected = Vec::new();
        for call in &calls {
            let mut cmd = match call.script {
                Some(script) => {
                    let mut cmd = redis::cmd("EVALSHA");
                    cmd.arg(script.get_hash()).arg(call.keys.len());
                    cmd
                }
                None => redis::cmd(call.command),
            };
            for key in &call.keys {
                cmd.arg(key);
            }
            for arg in &call.args {
                cmd.arg(arg.as_slice());
            }
            cmd.write_packed_command(&mut expected);
        }
        let packed = pack(&calls);
        assert_eq!(String::from_utf8_lossy(&packed), String::from_utf8_lossy(&expected));
        assert_eq!(packed.capacity(), packed.len(), "sized once");
    }
}
