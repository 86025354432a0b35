{
  "signatures": [
    {
      "keyid": "b62e867fa2f33afe",
      "sig": "244bb8b47738cdce1ece62efccf3664f31df45061852bbf3e60f609653f486a6d0b16631bce86936c0b97cae72dd178b5933acf14d8181e8ebe3b119eeb79d02"
    }
  ]
}
